package idempotency

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

const testTimeout = 30 * time.Second

// testService is the repository's one test service (package
// idempotencytest/testservice): it counts executions in Runs, and OnDo
// replaces Do's body.
type testService = testservice.Service

// eventLog records the interceptor's events so tests can wait for one.
type eventLog struct {
	mu     sync.Mutex
	events []Event
	signal chan struct{}
}

func newEventLog() *eventLog { return &eventLog{signal: make(chan struct{}, 1)} }

func (l *eventLog) observe(_ context.Context, e Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
	select {
	case l.signal <- struct{}{}:
	default:
	}
}

// count returns how many events had outcome o.
func (l *eventLog) count(o Outcome) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, e := range l.events {
		if e.Outcome == o {
			n++
		}
	}
	return n
}

// last returns the last event with outcome o.
func (l *eventLog) last(o Outcome) (Event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.events) - 1; i >= 0; i-- {
		if l.events[i].Outcome == o {
			return l.events[i], true
		}
	}
	return Event{}, false
}

// waitFor blocks until at least n events with outcome o were seen.
func (l *eventLog) waitFor(t *testing.T, o Outcome, n int) {
	t.Helper()
	deadline := time.NewTimer(testTimeout)
	defer deadline.Stop()
	for l.count(o) < n {
		select {
		case <-l.signal:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %d %q events; saw %d", n, o, l.count(o))
		}
	}
}

// testEnv is a gRPC server on bufconn with the interceptor, and a client.
type testEnv struct {
	svc    *testService
	client testingv1.TestServiceClient
	events *eventLog
	// wire holds the raw bytes of every response message the client
	// received, in order.
	wire *wireLog
}

type envConfig struct {
	opts  []Option
	outer []grpc.UnaryServerInterceptor
	svc   *testService
}

// newTestEnv starts a server whose only interceptors are outer (outermost
// first) and the idempotency interceptor on store.
func newTestEnv(t *testing.T, store Store, cfg envConfig) *testEnv {
	t.Helper()
	env := &testEnv{svc: cfg.svc, events: newEventLog(), wire: &wireLog{}}
	if env.svc == nil {
		env.svc = &testService{}
	}
	opts := append([]Option{WithObserver(env.events.observe)}, cfg.opts...)
	chain := append(append([]grpc.UnaryServerInterceptor{}, cfg.outer...), UnaryServerInterceptor(store, opts...))
	lis := testservice.Serve(t, env.svc, grpc.ChainUnaryInterceptor(chain...))
	env.client = testservice.Dial(t, lis, grpc.WithDefaultCallOptions(grpc.ForceCodec(recordingCodec{env.wire})))
	return env
}

// wireLog keeps the raw bytes of received messages.
type wireLog struct {
	mu   sync.Mutex
	msgs [][]byte
}

func (w *wireLog) lastN(n int) [][]byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.msgs) < n {
		return nil
	}
	return append([][]byte(nil), w.msgs[len(w.msgs)-n:]...)
}

// recordingCodec is the proto codec, recording the bytes it decodes, so a
// test can compare what went over the wire.
type recordingCodec struct{ log *wireLog }

func (recordingCodec) Name() string { return "proto" }

func (recordingCodec) Marshal(v any) ([]byte, error) { return proto.Marshal(v.(proto.Message)) }

func (c recordingCodec) Unmarshal(data []byte, v any) error {
	c.log.mu.Lock()
	c.log.msgs = append(c.log.msgs, append([]byte(nil), data...))
	c.log.mu.Unlock()
	return proto.Unmarshal(data, v.(proto.Message))
}

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// wantStatus fails unless err is a status with code c and, when reason is
// not empty, an ErrorInfo with that reason in ErrorDomain.
func wantStatus(t *testing.T, err error, c codes.Code, reason string) {
	t.Helper()
	if got := status.Code(err); got != c {
		t.Fatalf("code = %v (%v), want %v", got, err, c)
	}
	if reason != "" {
		if got := ReasonOf(err); got != reason {
			t.Fatalf("ErrorInfo reason = %q (%v), want %q", got, err, reason)
		}
	}
}

// recoverInterceptor turns a handler panic into Internal, as a recovery
// middleware would, so a test can observe what happens after a panic.
func recoverInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = status.Errorf(codes.Internal, "panic: %v", r)
		}
	}()
	return h(ctx, req)
}
