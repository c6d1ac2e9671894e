package idempotency

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// redisServer is a redis-server process started by the tests.
type redisServer struct {
	Addr string
	cmd  *exec.Cmd
	dir  string
	port int
}

var (
	sharedRedisOnce sync.Once
	sharedRedis     *redisServer
	sharedRedisErr  error
)

// requireRedisServer skips the test when redis-server is not installed, or
// fails it when CI is set: in CI every real-Redis test must run.
func requireRedisServer(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("redis-server is not on PATH and CI is set: real-Redis tests must run in CI (install redis-server)")
		}
		t.Skip("redis-server is not on PATH; install it to run the real-Redis tests")
	}
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startRedisServer starts a redis-server on a free loopback port with its
// data in dir, plus extra arguments, and waits until it answers PING.
func startRedisServer(dir string, port int, extra ...string) (*redisServer, error) {
	return startServerBinary("redis-server", dir, port, extra...)
}

// startServerBinary is startRedisServer for another binary speaking the
// same protocol and flags (valkey-server).
func startServerBinary(binary, dir string, port int, extra ...string) (*redisServer, error) {
	args := append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no", "--protected-mode", "no"}, extra...)
	cmd := exec.Command(binary, args...)
	logf, err := os.Create(filepath.Join(dir, fmt.Sprintf("redis-%d.log", port)))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", binary, err)
	}
	srv := &redisServer{Addr: fmt.Sprintf("127.0.0.1:%d", port), cmd: cmd, dir: dir, port: port}
	c := redis.NewClient(&redis.Options{Addr: srv.Addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return srv, nil
		}
		if time.Now().After(deadline) {
			srv.Stop()
			return nil, fmt.Errorf("%s on %s did not answer PING: %v", binary, srv.Addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop kills the server and waits for it to exit.
func (r *redisServer) Stop() {
	if r.cmd.Process != nil {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
	}
}

// newRedisServer starts a dedicated redis-server for one test.
func newRedisServer(t testing.TB, extra ...string) *redisServer {
	t.Helper()
	requireRedisServer(t)
	srv, err := startRedisServer(t.TempDir(), freePort(t), extra...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv
}

// sharedRedisServer returns the redis-server shared by the package's tests,
// started on first use and stopped by TestMain.
func sharedRedisServer(t testing.TB) *redisServer {
	t.Helper()
	requireRedisServer(t)
	sharedRedisOnce.Do(func() {
		dir, err := os.MkdirTemp("", "idempotency-redis-")
		if err != nil {
			sharedRedisErr = err
			return
		}
		sharedRedis, sharedRedisErr = startRedisServer(dir, freePort(t))
	})
	if sharedRedisErr != nil {
		t.Fatal(sharedRedisErr)
	}
	return sharedRedis
}

// quietRedisLog drops go-redis's own log lines: the outage and partition
// tests make it print hundreds of "failed to dial" lines that the tests
// expect and assert on by other means.
type quietRedisLog struct{}

func (quietRedisLog) Printf(context.Context, string, ...any) {}

// waitingParallel sets how many t.Parallel tests run at once when go test
// is not given -parallel: four per CPU instead of go test's one. The parallel
// tests wait on leases, replicas, timeouts and servers of their own far
// more than they compute (the package's run keeps about a fifth of one
// core busy), so at one per CPU a 2-core machine sat idle for most of the
// run: 38 s, against 13 s at four per CPU. An explicit -parallel N wins.
func waitingParallel() {
	flag.Parse()
	given := false
	flag.Visit(func(f *flag.Flag) { given = given || f.Name == "test.parallel" })
	if !given {
		_ = flag.Set("test.parallel", strconv.Itoa(4*runtime.GOMAXPROCS(0)))
	}
}

func TestMain(m *testing.M) {
	waitingParallel()
	redis.SetLogger(quietRedisLog{})
	// The Redis stores log configuration warnings (a client without
	// ContextTimeoutEnabled, miniredis refusing CONFIG GET) through
	// slog.Default; many tests build such stores on purpose. The tests of
	// those warnings use their own logger.
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	code := m.Run()
	stopSharedCluster()
	if sharedRedis != nil {
		sharedRedis.Stop()
		_ = os.RemoveAll(sharedRedis.dir)
	}
	os.Exit(code)
}

// backend is one store implementation under test, with the hooks the
// scenario tests need to reach below the Store interface.
type backend struct {
	name  string
	store Store
	// client is the go-redis client behind a Redis store (nil for memory).
	client redis.UniversalClient
	prefix string
	// expire makes the record of storeKey vanish, as if its lease or TTL
	// had run out.
	expire func(storeKey string)
	// plant writes raw bytes as the record of storeKey.
	plant func(storeKey string, record []byte)
	// exists reports whether storeKey holds a record.
	exists func(storeKey string) bool
	// mini is the miniredis server behind the store, or nil.
	mini *miniredis.Miniredis
}

// realTime makes the backend's TTLs count down with the wall clock until the
// test ends: miniredis's do only when fast-forwarded, so a goroutine does
// that every few milliseconds. The memory store and redis-server already
// count real time.
func (b *backend) realTime(t *testing.T) {
	if b.mini == nil {
		return
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	t.Cleanup(func() { close(stop); <-done })
	go func() {
		defer close(done)
		last := time.Now()
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case now := <-tick.C:
				b.mini.FastForward(now.Sub(last))
				last = now
			}
		}
	}()
}

// backendFactories are the store implementations every scenario runs
// against: the in-memory store, Redis on miniredis, and Redis on a real
// redis-server. Each test gets its own key prefix, so tests don't share
// records.
var backendFactories = []struct {
	name string
	new  func(t *testing.T) *backend
}{
	{"memory", newMemoryBackend},
	{"miniredis", newMiniredisBackend},
	{"redis-server", newRealRedisBackend},
}

func newMemoryBackend(t *testing.T) *backend {
	s := NewMemoryStore()
	return &backend{
		name:  "memory",
		store: s,
		expire: func(k string) {
			s.mu.Lock()
			delete(s.entries, k)
			s.mu.Unlock()
		},
		plant: func(k string, rec []byte) {
			s.mu.Lock()
			s.entries[k] = &memEntry{record: rec, expires: time.Now().Add(time.Hour)}
			s.mu.Unlock()
		},
		exists: func(k string) bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.live(k) != nil
		},
	}
}

func newMiniredisBackend(t *testing.T) *backend {
	m := miniredis.RunT(t)
	c := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { c.Close() })
	b := redisBackend(t, "miniredis", c)
	b.mini = m
	return b
}

func newRealRedisBackend(t *testing.T) *backend {
	srv := sharedRedisServer(t)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { c.Close() })
	return redisBackend(t, "redis-server", c)
}

func redisBackend(t *testing.T, name string, c redis.UniversalClient) *backend {
	prefix := fmt.Sprintf("test:%s:%d:", t.Name(), time.Now().UnixNano())
	ctx := context.Background()
	return &backend{
		name:   name,
		store:  NewRedisStore(c, WithKeyPrefix(prefix), WithRedisLogger(nil)),
		client: c,
		prefix: prefix,
		expire: func(k string) { c.Del(ctx, prefix+k) },
		plant: func(k string, rec []byte) {
			v, err := layoutValue(stateCompleted, "planted", rec)
			if err == nil {
				err = c.Set(ctx, prefix+k, v, 0).Err()
			}
			if err != nil {
				t.Fatalf("plant record: %v", err)
			}
		},
		exists: func(k string) bool { return c.Exists(ctx, prefix+k).Val() == 1 },
	}
}

// forEachBackend runs f as a subtest against every backend.
func forEachBackend(t *testing.T, f func(t *testing.T, b *backend)) {
	for _, bf := range backendFactories {
		t.Run(bf.name, func(t *testing.T) { f(t, bf.new(t)) })
	}
}

func newRedisClient(t testing.TB, addr string) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
	t.Cleanup(func() { c.Close() })
	return c
}

// rawRedisRecord reads the encoded record stored under the full Redis key
// fullKey, in either layout (see redis_layout.go). It returns redis.Nil
// when there is none.
func rawRedisRecord(ctx context.Context, c redis.Cmdable, fullKey string) ([]byte, error) {
	v, err := c.Get(ctx, fullKey).Result()
	if err != nil && strings.Contains(err.Error(), "WRONGTYPE") {
		return c.HGet(ctx, fullKey, "rec").Bytes()
	}
	if err != nil {
		return nil, err
	}
	rec, _, err := layoutRecord(v)
	return rec, err
}
