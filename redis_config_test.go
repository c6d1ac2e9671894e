package idempotency

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func bufferLogger() (*slog.Logger, *syncBuffer) {
	buf := &syncBuffer{}
	return slog.New(slog.NewTextHandler(buf, nil)), buf
}

// TestRedisEvictionPolicyWarning verifies that the store says, once, on
// first use, that Redis may evict its records when maxmemory-policy is not
// noeviction, says nothing when it is, and says the policy could not be
// checked when the server refuses CONFIG GET.
func TestRedisEvictionPolicyWarning(t *testing.T) {
	t.Parallel()
	requireRedisServer(t)
	for _, tc := range []struct {
		name   string
		args   []string
		want   []string // in the warning; none expected when empty
		refuse bool
	}{
		{"volatile-lru", []string{"--maxmemory", "100mb", "--maxmemory-policy", "volatile-lru"}, []string{"maxmemory-policy volatile-lru", "noeviction", "evict"}, false},
		{"allkeys-lfu", []string{"--maxmemory-policy", "allkeys-lfu"}, []string{"maxmemory-policy allkeys-lfu", "noeviction"}, false},
		{"noeviction", nil, nil, false},
		{"CONFIG refused", []string{"--rename-command", "CONFIG", ""}, []string{"could not check maxmemory-policy", "noeviction"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := newRedisServer(t, tc.args...)
			c := redis.NewClient(&redis.Options{Addr: srv.Addr, ContextTimeoutEnabled: true})
			t.Cleanup(func() { c.Close() })
			log, buf := bufferLogger()
			store := NewRedisStore(c, WithRedisLogger(log))
			ctx := testCtx(t)
			warnings := store.CheckConfig(ctx)
			if len(tc.want) == 0 {
				if len(warnings) != 0 {
					t.Fatalf("CheckConfig = %q, want no warning", warnings)
				}
			} else {
				if len(warnings) != 1 {
					t.Fatalf("CheckConfig = %q, want one warning", warnings)
				}
				for _, w := range tc.want {
					if !strings.Contains(warnings[0], w) {
						t.Fatalf("warning %q does not mention %q", warnings[0], w)
					}
				}
			}
			env := newTestEnv(t, store, envConfig{})
			for i := 0; i < 3; i++ {
				if _, err := env.client.Do(withKey(ctx, "evict"), &testingv1.DoRequest{}); err != nil {
					t.Fatal(err)
				}
			}
			if len(tc.want) == 0 {
				// The check ran (it logs nothing): wait for it by asking again.
				if w := store.CheckConfig(ctx); len(w) != 0 {
					t.Fatalf("CheckConfig = %q", w)
				}
				if got := buf.String(); got != "" {
					t.Fatalf("logged %q, want nothing", got)
				}
				return
			}
			waitUntil(t, "the store logs the warning", func() bool { return strings.Contains(buf.String(), tc.want[0]) })
			if n := strings.Count(buf.String(), "level=WARN"); n != 1 {
				t.Fatalf("logged %d warnings over 3 calls, want 1 (once per store):\n%s", n, buf.String())
			}
		})
	}
}

// TestStoreBoundsCallsWhenClientIgnoresDeadlines verifies that the wait,
// renew and complete bounds hold with a go-redis client created without
// ContextTimeoutEnabled (which would wait for its own ReadTimeout, here an
// hour): against a Redis that accepts connections and never answers, a call
// with a short deadline returns, and the store says why it bounds calls
// itself.
func TestStoreBoundsCallsWhenClientIgnoresDeadlines(t *testing.T) {
	t.Parallel()
	c := redis.NewClient(&redis.Options{Addr: silentRedis(t), ReadTimeout: time.Hour, WriteTimeout: time.Hour,
		DialTimeout: time.Hour, MaxRetries: -1, Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { c.Close() })
	store := NewRedisStore(c, WithRedisLogger(nil))
	cctx, ccancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer ccancel()
	w := store.CheckConfig(cctx) // bounded too: CONFIG GET gets no answer
	if len(w) == 0 || !strings.Contains(w[0], "ContextTimeoutEnabled") {
		t.Fatalf("CheckConfig = %q, want a warning naming ContextTimeoutEnabled", w)
	}

	returned := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_, err := store.Claim(ctx, "k", "tok", []byte("rec"), time.Minute)
		returned <- err
	}()
	select {
	case err := <-returned:
		if err == nil {
			t.Fatalf("Claim against a silent Redis succeeded")
		}
	case <-time.After(testTimeout):
		t.Fatalf("Claim with a 200ms deadline did not return within %v against a silent Redis", testTimeout)
	}

	env := newTestEnv(t, store, envConfig{})
	ctx, cancel := context.WithTimeout(withKey(testCtx(t), "silent"), 300*time.Millisecond)
	defer cancel()
	called := make(chan error, 1)
	go func() {
		_, err := env.client.Do(ctx, &testingv1.DoRequest{})
		called <- err
	}()
	select {
	case err := <-called:
		if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.Unavailable {
			t.Fatalf("call against a silent Redis: %v, want DeadlineExceeded or Unavailable", err)
		}
	case <-time.After(testTimeout):
		t.Fatalf("a call with a 300ms deadline did not return within %v against a silent Redis", testTimeout)
	}
	if n := env.svc.Runs.Load(); n != 0 {
		t.Fatalf("handler ran %d times without a claim", n)
	}
}

// silentRedis returns the address of a Redis that accepts connections,
// reads everything and answers nothing (a hung server); the connections
// are closed when the test ends.
func silentRedis(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu     sync.Mutex
		conns  []net.Conn
		closed bool
	)
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				conn.Close()
			} else {
				conns = append(conns, conn)
			}
			mu.Unlock()
			go func() { _, _ = io.Copy(io.Discard, conn) }()
		}
	}()
	return ln.Addr().String()
}
