package idempotencyconnect_test

import (
	"context"
	"errors"
	"net/http/httptrace"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/idempotency-grpc/idempotency"
	idempotencyconnect "github.com/idempotency-grpc/idempotency/connect"
	"github.com/idempotency-grpc/idempotency/connect/internal/gen/idempotency/testing/v1/testingv1connect"
	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// connectionHeaders are the connection-specific HTTP fields, and a
// reserved grpc- key, that a Connect handler can set but the record must
// not hold.
var connectionHeaders = []string{"Connection", "Content-Length", "Keep-Alive", "Proxy-Connection", "Te", "Trailer",
	"Transfer-Encoding", "Upgrade", "Grpc-Foo"}

// storedKeys returns the header and trailer keys of the record stored
// under key for Do.
func storedKeys(t *testing.T, store *idempotency.MemoryStore, key string) (header, trailer []string) {
	t.Helper()
	raw, _, err := store.Get(t.Context(), idempotency.StoreKey(testingv1connect.TestServiceDoProcedure, "", key))
	if err != nil {
		t.Fatalf("the record of %s: %v", key, err)
	}
	rec := &idempotencyv1.Record{}
	if err := proto.Unmarshal(raw, rec); err != nil {
		t.Fatal(err)
	}
	for _, e := range rec.GetHeader() {
		header = append(header, e.GetKey())
	}
	for _, e := range rec.GetTrailer() {
		trailer = append(trailer, e.GetKey())
	}
	return header, trailer
}

// TestConnectionHeadersNotStored checks, on every protocol and HTTP
// version (HTTP/1.1 included), that the connection-specific HTTP fields
// and reserved grpc- keys a handler sets in its header, trailer or error
// metadata are left out of the record, and that the replay succeeds with
// the rest of the metadata intact.
func TestConnectionHeadersNotStored(t *testing.T) {
	for _, k := range clientKinds {
		t.Run(k.name, func(t *testing.T) {
			svc := &service{onDo: func(ctx context.Context, req *connect.Request[testingv1.DoRequest], n int64) (*connect.Response[testingv1.DoResponse], error) {
				if req.Msg.GetId() == "fail" {
					ce := connect.NewError(connect.CodeNotFound, errors.New("no such account"))
					for _, h := range connectionHeaders {
						if h != "Transfer-Encoding" || k.h2c {
							ce.Meta().Set(h, "3")
						}
					}
					ce.Meta().Set("X-Error-Ref", "e-1")
					return nil, ce
				}
				resp := connect.NewResponse(&testingv1.DoResponse{Id: req.Msg.GetId(), Execution: n})
				for _, h := range connectionHeaders {
					resp.Trailer().Set(h, "3")
					if h == "Transfer-Encoding" && !k.h2c {
						// Over HTTP/1.1 it breaks the first answer itself
						// ("too many transfer encodings").
						continue
					}
					resp.Header().Set(h, "3")
				}
				resp.Header().Set("X-Keep", "yes")
				resp.Trailer().Set("X-Trail", "kept")
				return resp, nil
			}}
			store := idempotency.NewMemoryStore()
			var dropped []string
			p := idempotency.NewProtocol(store, idempotency.WithObserver(func(_ context.Context, e idempotency.Event) {
				if e.Outcome == idempotency.OutcomeExecuted {
					dropped = e.DroppedMetadata
				}
			}))
			s := newServer(t, svc, p)
			c := k.client(t, s)
			ctx := t.Context()

			first, err := c.Do(ctx, doReq("ok", &testingv1.DoRequest{Id: "x"}))
			if err != nil {
				t.Fatalf("first call: %v", err)
			}
			again, err := c.Do(ctx, doReq("ok", &testingv1.DoRequest{Id: "x"}))
			if err != nil {
				t.Fatalf("replay: %v", err)
			}
			if !idempotencyconnect.Replayed(again.Header()) || !proto.Equal(again.Msg, first.Msg) || svc.runs.Load() != 1 {
				t.Fatalf("replay %v (replayed %v, runs %d), want %v replayed after 1 run", again.Msg, idempotencyconnect.Replayed(again.Header()), svc.runs.Load(), first.Msg)
			}
			if again.Header().Get("X-Keep") != "yes" || again.Trailer().Get("X-Trail") != "kept" {
				t.Errorf("replay lost the rest of the metadata: header %v, trailer %v", again.Header(), again.Trailer())
			}
			header, trailer := storedKeys(t, store, "ok")
			if strings.Join(header, ",") != "x-keep" || strings.Join(trailer, ",") != "x-trail" {
				t.Errorf("stored header %v, trailer %v; want only x-keep and x-trail", header, trailer)
			}
			if len(dropped) != len(connectionHeaders) {
				t.Errorf("Event.DroppedMetadata = %q, want the %d keys set", dropped, len(connectionHeaders))
			}

			_, ferr := c.Do(ctx, doReq("fail", &testingv1.DoRequest{Id: "fail"}))
			_, rerr := c.Do(ctx, doReq("fail", &testingv1.DoRequest{Id: "fail"}))
			var re *connect.Error
			if connect.CodeOf(ferr) != connect.CodeNotFound || !errors.As(rerr, &re) || re.Code() != connect.CodeNotFound {
				t.Fatalf("stored error: first %v, replay %v; want NotFound both", ferr, rerr)
			}
			if !idempotencyconnect.Replayed(re.Meta()) || re.Meta().Get("X-Error-Ref") != "e-1" {
				t.Errorf("replayed error metadata %v: want the marker and X-Error-Ref", re.Meta())
			}
			header, trailer = storedKeys(t, store, "fail")
			if len(header) != 0 || strings.Join(trailer, ",") != "x-error-ref" {
				t.Errorf("stored error header %v, trailer %v; want only x-error-ref", header, trailer)
			}
		})
	}
}

// TestOlderRecordConnectionHeadersOverHTTP1 checks that a record written
// by an earlier version, holding connection-specific fields the handler
// had set (Connection: close and Transfer-Encoding among them), replays
// over HTTP/1.1 without them: the client keeps its connection, and the
// rest of the metadata is intact.
func TestOlderRecordConnectionHeadersOverHTTP1(t *testing.T) {
	store := idempotency.NewMemoryStore()
	svc := &service{}
	s := newServer(t, svc, idempotency.NewProtocol(store))
	c := clientKind{name: "connect/http1"}.client(t, s)

	resp, _ := proto.MarshalOptions{Deterministic: true}.Marshal(&testingv1.DoResponse{Id: "old", Execution: 7})
	fp, err := idempotency.DefaultFingerprint(testingv1connect.TestServiceDoProcedure, &testingv1.DoRequest{Id: "old"})
	if err != nil {
		t.Fatal(err)
	}
	entry := func(k, v string) *idempotencyv1.MetadataEntry {
		return &idempotencyv1.MetadataEntry{Key: k, Values: [][]byte{[]byte(v)}}
	}
	rec, err := proto.Marshal(&idempotencyv1.Record{Version: 1, State: idempotencyv1.Record_STATE_COMPLETED,
		Fingerprint: fp, Method: testingv1connect.TestServiceDoProcedure, Status: &idempotencyv1.Status{},
		ResponseType: "idempotency.testing.v1.DoResponse", Response: resp,
		Header: []*idempotencyv1.MetadataEntry{entry("connection", "close"), entry("keep-alive", "timeout=1"),
			entry("transfer-encoding", "chunked"), entry("x-keep", "yes")},
	})
	if err != nil {
		t.Fatal(err)
	}
	key := idempotency.StoreKey(testingv1connect.TestServiceDoProcedure, "", "old")
	if err := store.Complete(t.Context(), key, "earlier-version", rec, idempotency.DefaultTTL); err != nil {
		t.Fatal(err)
	}
	reused := 0
	for i := range 3 {
		ctx := httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
			if info.Reused {
				reused++
			}
		}})
		got, err := c.Do(ctx, doReq("old", &testingv1.DoRequest{Id: "old"}))
		if err != nil {
			t.Fatalf("replay %d of an older record: %v", i, err)
		}
		if got.Msg.GetExecution() != 7 || !idempotencyconnect.Replayed(got.Header()) || got.Header().Get("X-Keep") != "yes" {
			t.Fatalf("replay %d: %v, header %v; want execution 7, replayed, X-Keep", i, got.Msg, got.Header())
		}
		if got.Header().Get("Keep-Alive") != "" {
			t.Errorf("replay %d carried Keep-Alive %q", i, got.Header().Get("Keep-Alive"))
		}
	}
	if svc.runs.Load() != 0 {
		t.Fatalf("handler ran %d times, want 0", svc.runs.Load())
	}
	if reused != 2 {
		t.Errorf("%d of the 2 later replays reused the HTTP/1.1 connection, want 2: a replayed Connection: close closes it", reused)
	}
}

// TestGRPCRecordReplayedOverHTTP1 checks the case that makes storing
// connection-specific fields dangerous: one Protocol serves a grpc-go
// server and a Connect handler, a grpc-go handler sets Transfer-Encoding
// and Connection in its header metadata (grpc-go passes them on over
// HTTP/2), and the repeat arrives over Connect on HTTP/1.1. The replay must
// succeed, with the rest of the header, on a connection the client keeps.
func TestGRPCRecordReplayedOverHTTP1(t *testing.T) {
	p := idempotency.NewProtocol(idempotency.NewMemoryStore())
	gsvc := &testservice.Service{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		if err := grpc.SetHeader(ctx, metadata.Pairs("transfer-encoding", "chunked", "connection", "close", "x-keep", "yes")); err != nil {
			return nil, err
		}
		return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
	}}
	lis := testservice.Serve(t, gsvc, grpc.ChainUnaryInterceptor(p.UnaryServerInterceptor()))
	gc := testservice.Dial(t, lis)
	gctx := metadata.AppendToOutgoingContext(t.Context(), idempotency.DefaultKeyHeader, "cross")
	first, err := gc.Do(gctx, &testingv1.DoRequest{Id: "x"})
	if err != nil {
		t.Fatalf("first call through grpc-go: %v", err)
	}

	csvc := &service{}
	c := clientKind{name: "connect/http1"}.client(t, newServer(t, csvc, p))
	reused := 0
	for i := range 3 {
		ctx := httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
			if info.Reused {
				reused++
			}
		}})
		got, err := c.Do(ctx, doReq("cross", &testingv1.DoRequest{Id: "x"}))
		if err != nil {
			t.Fatalf("replay %d over Connect on HTTP/1.1 of a record written through grpc-go: %v", i, err)
		}
		if !proto.Equal(got.Msg, first) || !idempotencyconnect.Replayed(got.Header()) || got.Header().Get("X-Keep") != "yes" {
			t.Fatalf("replay %d: %v, header %v; want %v replayed with X-Keep", i, got.Msg, got.Header(), first)
		}
	}
	if n := gsvc.Runs.Load() + csvc.runs.Load(); n != 1 {
		t.Fatalf("handlers ran %d times, want 1", n)
	}
	if reused != 2 {
		t.Errorf("%d of the 2 later replays reused the HTTP/1.1 connection, want 2", reused)
	}
}
