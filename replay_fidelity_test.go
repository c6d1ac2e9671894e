package idempotency

import (
	"context"
	"testing"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// wantSameStatus fails unless two errors carry the same code, message and
// details.
func wantSameStatus(t *testing.T, first, replay error) {
	t.Helper()
	a, b := status.Convert(first).Proto(), status.Convert(replay).Proto()
	if !proto.Equal(a, b) {
		t.Fatalf("replayed status differs from the first answer:\n first: %v\nreplay: %v", a, b)
	}
}

// TestNonUTF8ErrorMessageIsStored verifies that a stored-code error whose
// message is not valid UTF-8 is stored (it cannot go into the record as is)
// and replayed exactly as the client received it the first time: grpc-go
// turns each invalid byte into U+FFFD, and drops the details of a status it
// cannot encode.
func TestNonUTF8ErrorMessageIsStored(t *testing.T) {
	info := &errdetails.ErrorInfo{Reason: "CARD_DECLINED", Domain: "bank.example"}
	for _, tc := range []struct {
		name string
		err  func() error
	}{
		{"bare", func() error {
			return status.Error(codes.FailedPrecondition, "card \xff\xfe declined, caf\u00e9 ok, \xc3")
		}},
		{"with details", func() error {
			st, err := status.New(codes.FailedPrecondition, "card \xff declined").WithDetails(info)
			if err != nil {
				panic(err)
			}
			return st.Err()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
					return nil, tc.err()
				}}
				env := newTestEnv(t, b.store, envConfig{svc: svc})
				ctx := withKey(testCtx(t), "latin1")
				_, first := env.client.Do(ctx, &testingv1.DoRequest{})
				wantStatus(t, first, codes.FailedPrecondition, "")
				var header metadata.MD
				_, replay := env.client.Do(ctx, &testingv1.DoRequest{}, grpc.Header(&header))
				if n := env.svc.Runs.Load(); n != 1 {
					t.Fatalf("handler ran %d times, want 1 (events: executed=%d not_stored=%d)", n, env.events.count(OutcomeExecuted), env.events.count(OutcomeNotStored))
				}
				if !Replayed(header) {
					t.Fatalf("the repeat was not a replay")
				}
				wantSameStatus(t, first, replay)
			})
		})
	}
}

// TestReplayKeepsEveryHeaderValue verifies that header and trailer values
// outside printable ASCII that gRPC delivers (UTF-8, a tab, obs-text bytes)
// are replayed exactly as the first answer carried them.
func TestReplayKeepsEveryHeaderValue(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			_ = grpc.SetHeader(ctx, metadata.Pairs("x-note", "caf\u00e9", "x-tab", "a\tb", "x-raw", "\xff\x80", "x-plain", "ok"))
			_ = grpc.SetTrailer(ctx, metadata.Pairs("x-trail", "na\u00efve \u2713"))
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		env := newTestEnv(t, b.store, envConfig{svc: svc})
		ctx := withKey(testCtx(t), "utf8-headers")
		var h1, t1, h2, t2 metadata.MD
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{}, grpc.Header(&h1), grpc.Trailer(&t1)); err != nil {
			t.Fatal(err)
		}
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{}, grpc.Header(&h2), grpc.Trailer(&t2)); err != nil {
			t.Fatal(err)
		}
		if n := env.svc.Runs.Load(); n != 1 || !Replayed(h2) {
			t.Fatalf("runs = %d, second answer replayed = %v; want 1 run and a replay", n, Replayed(h2))
		}
		for _, k := range []string{"x-note", "x-tab", "x-raw", "x-plain"} {
			if got, want := h2.Get(k), h1.Get(k); len(want) != 1 || len(got) != 1 || got[0] != want[0] {
				t.Errorf("header %s: first answer %q, replay %q", k, want, got)
			}
		}
		if got, want := t2.Get("x-trail"), t1.Get("x-trail"); len(want) != 1 || len(got) != 1 || got[0] != want[0] {
			t.Errorf("trailer x-trail: first answer %q, replay %q", want, got)
		}
	})
}

// TestBareContextErrorClassifiedAsGRPCDoes verifies that a handler error
// that is not a status is classified as grpc-go sends it: a bare
// context.DeadlineExceeded is DeadlineExceeded (not Unknown), so with a
// stored DeadlineExceeded the repeat gets the code the first caller got.
func TestBareContextErrorClassifiedAsGRPCDoes(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			return nil, context.DeadlineExceeded
		}}
		stored := WithStoredCodes(func(c codes.Code) bool { return c == codes.OK || c == codes.DeadlineExceeded })
		env := newTestEnv(t, b.store, envConfig{svc: svc, opts: []Option{stored}})
		ctx := withKey(testCtx(t), "bare-deadline")
		_, first := env.client.Do(ctx, &testingv1.DoRequest{})
		wantStatus(t, first, codes.DeadlineExceeded, "")
		_, replay := env.client.Do(ctx, &testingv1.DoRequest{})
		if n := env.svc.Runs.Load(); n != 1 {
			t.Fatalf("handler ran %d times, want 1", n)
		}
		wantSameStatus(t, first, replay)
		if e, ok := env.events.last(OutcomeExecuted); !ok || e.Code != codes.DeadlineExceeded {
			t.Fatalf("executed event = %+v, %v; want code DeadlineExceeded", e, ok)
		}
		// Without a key the event still names the code the client got.
		_, err := env.client.Do(testCtx(t), &testingv1.DoRequest{})
		wantStatus(t, err, codes.DeadlineExceeded, "")
		if e, ok := env.events.last(OutcomePassThrough); !ok || e.Code != codes.DeadlineExceeded {
			t.Fatalf("pass-through event = %+v, %v; want code DeadlineExceeded", e, ok)
		}
	})
}

// TestHandlerCannotFakeReplayMarker verifies that the replay marker is the
// interceptor's alone: a handler that sets idempotency-replayed itself (a
// proxy forwarding a downstream's headers) never makes a first answer, a
// keyless call or an ignored method look like a replay, and a real replay
// carries the marker once.
func TestHandlerCannotFakeReplayMarker(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			fake := metadata.Pairs(ReplayedHeader, "true", "x-downstream", "yes")
			_ = grpc.SetHeader(ctx, fake)
			_ = grpc.SetTrailer(ctx, fake)
			if req.GetId() == "send" {
				_ = grpc.SendHeader(ctx, metadata.Pairs(ReplayedHeader, "true"))
			}
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		for _, tc := range []struct {
			name string
			opts []Option
			key  string
			id   string
		}{
			{"first execution", nil, "fake-marker", ""},
			{"first execution, SendHeader", nil, "fake-marker-send", "send"},
			{"no key", nil, "", ""},
			{"ignored method", []Option{WithIgnoredMethods(methodDo)}, "fake-marker", ""},
		} {
			env := newTestEnv(t, b.store, envConfig{svc: svc, opts: tc.opts})
			ctx := testCtx(t)
			if tc.key != "" {
				ctx = withKey(ctx, tc.key)
			}
			var header, trailer metadata.MD
			if _, err := env.client.Do(ctx, &testingv1.DoRequest{Id: tc.id}, grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if Replayed(header) || Replayed(trailer) {
				t.Fatalf("%s: answer marked as a replay by the handler's own metadata: header %v trailer %v", tc.name, header, trailer)
			}
			if header.Get("x-downstream") == nil && tc.id == "" {
				t.Fatalf("%s: the handler's other headers were lost: %v", tc.name, header)
			}
		}
		env := newTestEnv(t, b.store, envConfig{svc: svc})
		ctx := withKey(testCtx(t), "fake-marker-replay")
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{}); err != nil {
			t.Fatal(err)
		}
		var header, trailer metadata.MD
		if _, err := env.client.Do(ctx, &testingv1.DoRequest{}, grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
			t.Fatal(err)
		}
		if got := header.Get(ReplayedHeader); len(got) != 1 || got[0] != "true" || trailer.Get(ReplayedHeader) != nil {
			t.Fatalf("replay: marker in header %q, trailer %q; want exactly one \"true\" in the header", got, trailer.Get(ReplayedHeader))
		}
	})
}
