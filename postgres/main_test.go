package idempotencypg

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestMain(m *testing.M) {
	// Four t.Parallel tests per CPU unless go test is given -parallel, as
	// in the core module (harness_test.go): they wait on leases, timeouts
	// and the server far more than they compute.
	flag.Parse()
	given := false
	flag.Visit(func(f *flag.Flag) { given = given || f.Name == "test.parallel" })
	if !given {
		_ = flag.Set("test.parallel", strconv.Itoa(4*runtime.GOMAXPROCS(0)))
	}
	code := m.Run()
	pgtest.StopShared()
	os.Exit(code)
}

var tables atomic.Int64

// testStore returns a store on a table of its own in the shared cluster,
// and its pool. Since no two tests share a table, the tests that mostly wait
// out leases and timeouts run in parallel (t.Parallel); the ones that load
// the server (the sweep and the storms) do not.
func testStore(t testing.TB, opts ...Option) (*Store, *pgxpool.Pool) {
	t.Helper()
	pool := pgtest.Shared(t).Pool(t, func(c *pgxpool.Config) { c.MaxConns = 40 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts = append([]Option{WithTable(fmt.Sprintf("records_%d", tables.Add(1)))}, opts...)
	if err := CreateSchema(ctx, pool, opts...); err != nil {
		t.Fatal(err)
	}
	s, err := New(ctx, pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return s, pool
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}
