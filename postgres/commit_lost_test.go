package idempotencypg

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync"
	"testing"

	"github.com/idempotency-grpc/idempotency"
	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// cutProxy forwards TCP connections to Postgres, and can cut one of them
// around its next write from the client that holds a COMMIT: after forwarding it (the
// server applies it, its reply is lost) or instead of forwarding it (the
// server never sees it).
type cutProxy struct {
	lis      net.Listener
	upstream string
	mu       sync.Mutex
	armed    map[string]string // client address -> "after" or "instead"
}

func newCutProxy(t *testing.T, upstream string) *cutProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &cutProxy{lis: lis, upstream: upstream, armed: map[string]string{}}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *cutProxy) arm(clientAddr, how string) {
	p.mu.Lock()
	p.armed[clientAddr] = how
	p.mu.Unlock()
}

func (p *cutProxy) serve(c net.Conn) {
	s, err := net.Dial("tcp", p.upstream)
	if err != nil {
		c.Close()
		return
	}
	go func() { _, _ = io.Copy(c, s); c.Close() }()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if err != nil {
			s.Close()
			return
		}
		p.mu.Lock()
		how := p.armed[c.RemoteAddr().String()]
		p.mu.Unlock()
		if how != "" && !bytes.Contains(buf[:n], []byte("COMMIT")) {
			how = "" // not the commit's round trip yet
		}
		if how == "instead" {
			c.Close()
			s.Close()
			return
		}
		if _, err := s.Write(buf[:n]); err != nil {
			c.Close()
			return
		}
		if how == "after" {
			c.Close() // the reply will find nobody: lost
			s.Close()
			return
		}
	}
}

// A commit whose reply is lost is resolved by reading the database, never
// guessed: applied, the call answers with its response; not applied, with
// OUTCOME_NOT_COMMITTED, and the retry runs it once.
func TestTxCommitReplyLost(t *testing.T) {
	for _, how := range []string{"after", "instead"} {
		t.Run("cut "+how+" the commit", func(t *testing.T) {
			cluster := pgtest.Shared(t)
			proxy := newCutProxy(t, "127.0.0.1:"+itoa(cluster.Port))
			b := newBank(t)
			// The bank's store, through the proxy.
			pool := cluster.Pool(t, func(c *pgxpool.Config) {
				c.ConnConfig.Host, c.ConnConfig.Port = "127.0.0.1", uint16(proxy.lis.Addr().(*net.TCPAddr).Port)
				// Statements go with their text (no cached prepared
				// statements), so the proxy can tell the commit's round trip.
				c.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
			})
			b.store.pool = pool
			b.store.testHook = func(point string, conn *pgx.Conn) {
				if point == "commit" {
					proxy.arm(conn.PgConn().Conn().LocalAddr().String(), how)
				}
			}
			ctx := testCtx(t)
			resp, _, err := b.charge(ctx, "cut", 11)
			if how == "after" {
				require.NoError(t, err, "the commit was applied: the call must answer with its response")
				require.NotEmpty(t, resp.GetChargeId())
				b.event(t, idempotency.OutcomeExecuted)
			} else {
				require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
				require.Equal(t, idempotency.ReasonNotCommitted, idempotency.ReasonOf(err))
				e := b.event(t, idempotency.OutcomeRolledBack)
				require.NotErrorIs(t, e.Err, idempotency.ErrCommitUnknown)
				require.Equal(t, 0, b.rows(t))
			}
			b.store.testHook = nil
			again, h, err := b.charge(ctx, "cut", 11)
			require.NoError(t, err)
			if how == "after" {
				require.Equal(t, []string{"true"}, h.Get(idempotency.ReplayedHeader))
				require.Equal(t, resp.GetChargeId(), again.GetChargeId())
				require.EqualValues(t, 1, b.svc.Runs.Load())
			} else {
				require.EqualValues(t, 2, b.svc.Runs.Load())
			}
			require.Equal(t, 1, b.rows(t), "business rows")
		})
	}
}

func itoa(n int) string { return (&net.TCPAddr{Port: n}).String()[1:] }

var _ = context.Background
