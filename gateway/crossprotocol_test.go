package idempotencygw_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/alicebob/miniredis/v2"
	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	idempotencygw "github.com/idempotency-grpc/idempotency/gateway"
	testgw "github.com/idempotency-grpc/idempotency/gateway/internal/gen/idempotency/testing/v1"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// everyClient is one service, Do of the test service counting its
// executions, reached three ways: by a grpc-go client through a gRPC
// server with the core's interceptor, by a REST client through
// grpc-gateway into that server, and by connect-go clients through a
// connect-go handler with the connect module's interceptor.
type everyClient struct {
	svc     *testservice.Service
	grpc    testingv1.TestServiceClient
	rest    *gateway
	connect map[string]*connect.Client[testingv1.DoRequest, testingv1.DoResponse]
	// onRetry, when set, is called with the amount of each request
	// refused as in progress.
	onRetry func(amount int64)
}

// newEveryClient serves svc over gRPC with grpcSide and over connect-go
// with connectSide: the same Protocol for one server process, or two over
// one store for two processes.
func newEveryClient(t *testing.T, grpcSide, connectSide *idempotency.Protocol) *everyClient {
	t.Helper()
	svc := &testservice.Service{}
	lis := testservice.Serve(t, svc, grpc.ChainUnaryInterceptor(grpcSide.UnaryServerInterceptor()))
	e := &everyClient{svc: svc, grpc: testservice.Dial(t, lis), connect: map[string]*connect.Client[testingv1.DoRequest, testingv1.DoResponse]{}}

	mux := runtime.NewServeMux(idempotencygw.ServeMuxOption())
	if err := testgw.RegisterTestServiceHandlerClient(t.Context(), mux, testservice.Dial(t, lis)); err != nil {
		t.Fatalf("register the gateway handlers: %v", err)
	}
	rest := httptest.NewServer(mux)
	t.Cleanup(rest.Close)
	e.rest = &gateway{svc: svc, url: rest.URL, hc: rest.Client()}

	do := connect.NewUnaryHandler(testservice.MethodDo,
		func(ctx context.Context, req *connect.Request[testingv1.DoRequest]) (*connect.Response[testingv1.DoResponse], error) {
			resp, err := svc.Do(ctx, req.Msg)
			if err != nil {
				return nil, err
			}
			return connect.NewResponse(resp), nil
		},
		connect.WithInterceptors(idempotencyconnect.NewInterceptor(connectSide)))
	cs := testservice.ServeHTTP(t, do)
	url := cs.URL + testservice.MethodDo
	e.connect["connect"] = connect.NewClient[testingv1.DoRequest, testingv1.DoResponse](cs.Client(), url)
	e.connect["connect-grpc"] = connect.NewClient[testingv1.DoRequest, testingv1.DoResponse](testservice.HTTPClient(t, true), url, connect.WithGRPC())
	e.connect["connect-grpcweb"] = connect.NewClient[testingv1.DoRequest, testingv1.DoResponse](cs.Client(), url, connect.WithGRPCWeb())
	return e
}

// answer is what a client got: the execution its response carries, and
// whether it was marked as a replay; retry is true for KEY_IN_PROGRESS.
type crossAnswer struct {
	execution int64
	id        string
	replayed  bool
	retry     bool
}

// call sends Do{id, amount} with key through the client named by via.
func (e *everyClient) call(ctx context.Context, via, key, id string, amount int64) (crossAnswer, error) {
	req := &testingv1.DoRequest{Id: id, Amount: amount}
	switch via {
	case "grpc":
		var header metadata.MD
		resp, err := e.grpc.Do(metadata.AppendToOutgoingContext(ctx, idempotency.DefaultKeyHeader, key), req, grpc.Header(&header))
		if status.Code(err) == codes.Aborted && idempotency.ReasonOf(err) == idempotency.ReasonInProgress {
			return crossAnswer{retry: true}, nil
		}
		if err != nil {
			return crossAnswer{}, fmt.Errorf("grpc: %w", err)
		}
		return crossAnswer{execution: resp.GetExecution(), id: resp.GetId(), replayed: idempotency.Replayed(header)}, nil
	case "rest":
		a, err := e.rest.send(ctx, "/v1/do", fmt.Sprintf(`{"id":%q,"amount":"%d"}`, id, amount), strconv.Quote(key))
		if err != nil {
			return crossAnswer{}, err
		}
		if a.status == http.StatusConflict {
			return crossAnswer{retry: true}, nil
		}
		if a.status != http.StatusOK {
			return crossAnswer{}, fmt.Errorf("rest: status %d: %s", a.status, a.body)
		}
		var body struct {
			ID        string `json:"id"`
			Execution string `json:"execution"`
		}
		if err := json.Unmarshal(a.body, &body); err != nil {
			return crossAnswer{}, fmt.Errorf("rest: body %s: %w", a.body, err)
		}
		n, _ := strconv.ParseInt(body.Execution, 10, 64)
		return crossAnswer{execution: n, id: body.ID, replayed: a.replayed()}, nil
	default:
		r := connect.NewRequest(req)
		r.Header().Set(idempotencygw.KeyHeader, key)
		resp, err := e.connect[via].CallUnary(ctx, r)
		if connect.CodeOf(err) == connect.CodeAborted && idempotencyconnect.ReasonOf(err) == idempotency.ReasonInProgress {
			return crossAnswer{retry: true}, nil
		}
		if err != nil {
			return crossAnswer{}, fmt.Errorf("%s: %w", via, err)
		}
		return crossAnswer{execution: resp.Msg.GetExecution(), id: resp.Msg.GetId(), replayed: idempotencyconnect.Replayed(resp.Header())}, nil
	}
}

// until calls until the answer is not KEY_IN_PROGRESS, backing off.
func (e *everyClient) until(ctx context.Context, via, key, id string, amount int64) (crossAnswer, error) {
	wait := time.Millisecond
	for {
		a, err := e.call(ctx, via, key, id, amount)
		if err != nil || !a.retry {
			return a, err
		}
		if e.onRetry != nil {
			e.onRetry(amount)
		}
		select {
		case <-ctx.Done():
			return a, fmt.Errorf("%s: still in progress: %w", via, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 50*time.Millisecond)
	}
}

var crossVias = []string{"rest", "grpc", "connect", "connect-grpc", "connect-grpcweb"}

// crossSetups are the deployments the cross-protocol tests run on: one
// process serving gRPC and Connect through one Protocol, and two
// processes (two Protocols) sharing one Redis.
func crossSetups(t *testing.T) map[string]func(t *testing.T) *everyClient {
	return map[string]func(t *testing.T) *everyClient{
		"one-protocol/memory": func(t *testing.T) *everyClient {
			p := idempotency.NewProtocol(idempotency.NewMemoryStore())
			return newEveryClient(t, p, p)
		},
		"two-protocols/redis": func(t *testing.T) *everyClient {
			mr := miniredis.RunT(t)
			rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
			t.Cleanup(func() { _ = rdb.Close() })
			store := idempotency.NewRedisStore(rdb)
			return newEveryClient(t, idempotency.NewProtocol(store), idempotency.NewProtocol(store))
		},
	}
}

// TestEveryClientOneExecution is the guarantee across transports: a REST
// client, a gRPC client and connect-go clients (Connect, gRPC and gRPC-Web
// protocols) send the same request with the same key; whichever comes
// first runs the handler, and every other gets its answer replayed,
// marked. Each transport takes a turn at going first.
func TestEveryClientOneExecution(t *testing.T) {
	for name, setup := range crossSetups(t) {
		t.Run(name, func(t *testing.T) {
			e := setup(t)
			for i, first := range crossVias {
				key := "cross-" + first
				id := fmt.Sprintf("req-%d", i)
				a, err := e.call(t.Context(), first, key, id, 7)
				if err != nil {
					t.Fatal(err)
				}
				if a.replayed || a.id != id {
					t.Fatalf("%s first: %+v, want a fresh answer for %s", first, a, id)
				}
				for _, via := range crossVias {
					r, err := e.call(t.Context(), via, key, id, 7)
					if err != nil {
						t.Fatal(err)
					}
					if via == first {
						continue
					}
					if !r.replayed || r.execution != a.execution || r.id != id {
						t.Errorf("%s after %s: %+v, want the replay of %+v", via, first, r, a)
					}
				}
				// The same key with another request is refused on every
				// transport.
				for _, via := range crossVias {
					if _, err := e.call(t.Context(), via, key, id, 8); err == nil {
						t.Errorf("%s: another request under %s's key was accepted", via, first)
					}
				}
			}
			if n, want := e.svc.Runs.Load(), int64(len(crossVias)); n != want {
				t.Errorf("handler ran %d times for %d keys, want %d", n, want, want)
			}
		})
	}
}

// TestEveryClientConcurrent sends the same keyed request through every
// transport at once, for many keys, each client retrying while the first
// call is in progress: the handler runs exactly once per key and every
// client gets the same execution.
func TestEveryClientConcurrent(t *testing.T) {
	for name, setup := range crossSetups(t) {
		t.Run(name, func(t *testing.T) {
			e := setup(t)
			const keys = 20
			ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
			defer cancel()
			// Each key's first execution holds until the key has been
			// refused as in progress len(crossVias)-1 times, so the
			// transports do overlap on every key.
			var refused [keys]atomic.Int64
			var overlap [keys]chan struct{}
			for k := range overlap {
				overlap[k] = make(chan struct{})
			}
			e.svc.OnDo = func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
				select {
				case <-overlap[req.GetAmount()]:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
				return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
			}
			e.onRetry = func(amount int64) {
				if refused[amount].Add(1) == int64(len(crossVias)-1) {
					close(overlap[amount])
				}
			}
			got := make([][]crossAnswer, keys)
			var mu sync.Mutex
			var wg sync.WaitGroup
			for k := range keys {
				for _, via := range crossVias {
					wg.Go(func() {
						a, err := e.until(ctx, via, fmt.Sprintf("storm-%d", k), "s", int64(k))
						if err != nil {
							t.Error(err)
							return
						}
						mu.Lock()
						got[k] = append(got[k], a)
						mu.Unlock()
					})
				}
			}
			wg.Wait()
			if n := e.svc.Runs.Load(); n != keys {
				t.Errorf("handler ran %d times for %d keys, want %d", n, keys, keys)
			}
			for k, as := range got {
				fresh := 0
				for _, a := range as {
					if !a.replayed {
						fresh++
					}
					if a.execution != as[0].execution {
						t.Errorf("key %d: answers %+v carry different executions", k, as)
						break
					}
				}
				if fresh != 1 || len(as) != len(crossVias) {
					t.Errorf("key %d: %d answers, %d fresh; want %d, 1", k, len(as), fresh, len(crossVias))
				}
			}
		})
	}
}
