// Package testservice is the one test gRPC service of this repository, with
// in-memory (bufconn) serve and dial helpers: the package's own tests, its
// examples, the example server's tests and the otel module's all use it,
// and so can the tests of a custom store or interceptor chain.
//
// It depends on grpc and the generated test service only, not on package
// idempotency, so the package's internal tests can import it.
package testservice

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
)

// Method names of the test service, as interceptors see them.
const (
	MethodDo     = "/idempotency.testing.v1.TestService/Do"
	MethodCharge = "/idempotency.testing.v1.TestService/Charge"
	MethodRead   = "/idempotency.testing.v1.TestService/Read"
)

// Service implements the test service and counts executions, which is what
// "exactly once" tests assert on. Do and Charge declare nothing, require a
// key, respectively; Read is declared NO_SIDE_EFFECTS (see
// proto/idempotency/testing/v1).
type Service struct {
	testingv1.UnimplementedTestServiceServer

	// Runs counts executions of Do and Charge; Reads those of Read.
	Runs  atomic.Int64
	Reads atomic.Int64
	// OnDo, when set, replaces Do's body; n is the execution number (1 for
	// the first). By default Do echoes the request's id and payload with n.
	OnDo func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error)
	// OnCharge, when set, replaces Charge's body. By default Charge answers
	// charge id "ch_<n>".
	OnCharge func(ctx context.Context, req *testingv1.ChargeRequest, n int64) (*testingv1.ChargeResponse, error)
}

// Do counts an execution and runs OnDo, or echoes the request.
func (s *Service) Do(ctx context.Context, req *testingv1.DoRequest) (*testingv1.DoResponse, error) {
	n := s.Runs.Add(1)
	if s.OnDo != nil {
		return s.OnDo(ctx, req, n)
	}
	return &testingv1.DoResponse{Id: req.GetId(), Execution: n, Payload: req.GetPayload()}, nil
}

// Charge counts an execution and runs OnCharge, or answers "ch_<n>".
func (s *Service) Charge(ctx context.Context, req *testingv1.ChargeRequest) (*testingv1.ChargeResponse, error) {
	n := s.Runs.Add(1)
	if s.OnCharge != nil {
		return s.OnCharge(ctx, req, n)
	}
	return &testingv1.ChargeResponse{ChargeId: fmt.Sprintf("ch_%d", n)}, nil
}

// Read counts a read and echoes the id.
func (s *Service) Read(ctx context.Context, req *testingv1.ReadRequest) (*testingv1.ReadResponse, error) {
	s.Reads.Add(1)
	return &testingv1.ReadResponse{Id: req.GetId()}, nil
}

// Listen serves svc on a new in-memory listener with the server options
// given (typically grpc.ChainUnaryInterceptor(...)), and returns the
// listener and a function that stops the server.
func Listen(svc testingv1.TestServiceServer, opts ...grpc.ServerOption) (*bufconn.Listener, func()) {
	srv := grpc.NewServer(opts...)
	testingv1.RegisterTestServiceServer(srv, svc)
	lis := bufconn.Listen(1 << 20)
	go func() { _ = srv.Serve(lis) }()
	return lis, srv.Stop
}

// Connect returns a client of the test service on lis, with the dial
// options given (typically grpc.WithChainUnaryInterceptor(...)), and a
// function that closes its connection.
func Connect(lis *bufconn.Listener, opts ...grpc.DialOption) (testingv1.TestServiceClient, func(), error) {
	opts = append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, opts...)
	conn, err := grpc.NewClient("passthrough:///bufnet", opts...)
	if err != nil {
		return nil, nil, err
	}
	return testingv1.NewTestServiceClient(conn), func() { _ = conn.Close() }, nil
}

// Serve is Listen for a test: the server stops when the test ends.
func Serve(tb testing.TB, svc testingv1.TestServiceServer, opts ...grpc.ServerOption) *bufconn.Listener {
	tb.Helper()
	lis, stop := Listen(svc, opts...)
	tb.Cleanup(stop)
	return lis
}

// Dial is Connect for a test: the connection closes when the test ends, and
// a dial error fails the test.
func Dial(tb testing.TB, lis *bufconn.Listener, opts ...grpc.DialOption) testingv1.TestServiceClient {
	tb.Helper()
	client, closeConn, err := Connect(lis, opts...)
	if err != nil {
		tb.Fatalf("dial the test service: %v", err)
	}
	tb.Cleanup(closeConn)
	return client
}

// Start serves svc and connects to it, for code without a testing.TB (an
// Example): stop closes the connection and the server.
func Start(svc testingv1.TestServiceServer, server []grpc.ServerOption, dial ...grpc.DialOption) (client testingv1.TestServiceClient, stop func(), err error) {
	lis, stopServer := Listen(svc, server...)
	client, closeConn, err := Connect(lis, dial...)
	if err != nil {
		stopServer()
		return nil, nil, err
	}
	return client, func() { closeConn(); stopServer() }, nil
}

// ServeHTTP serves h on a loopback httptest.Server that speaks HTTP/1.1 and
// HTTP/2 without TLS (h2c), as connect-go's protocols need (gRPC runs on
// HTTP/2 only), closed when the test ends.
func ServeHTTP(tb testing.TB, h http.Handler) *httptest.Server {
	tb.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	tb.Cleanup(srv.Close)
	return srv
}

// HTTPClient returns an HTTP client that speaks only HTTP/2 without TLS
// (h2c) when h2c is true, only HTTP/1.1 otherwise, its idle connections
// closed when the test ends.
func HTTPClient(tb testing.TB, h2c bool) *http.Client {
	tr := &http.Transport{Protocols: new(http.Protocols)}
	if h2c {
		tr.Protocols.SetUnencryptedHTTP2(true)
	} else {
		tr.Protocols.SetHTTP1(true)
	}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}
