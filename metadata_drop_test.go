package idempotency

import (
	"context"
	"slices"
	"strings"
	"testing"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// notStoredHeader and notStoredTrailer are what a handler may set that the
// interceptor must leave out of the record: reserved grpc- keys (grpc-go
// passes grpc-foo and grpc-retry-pushback-ms on to the client; a record
// holding them is refused on replay) and the connection-specific HTTP
// fields.
var (
	notStoredHeader = []string{"grpc-foo", "grpc-retry-pushback-ms", "connection", "content-length", "keep-alive",
		"proxy-connection", "trailer", "transfer-encoding", "upgrade"}
	notStoredTrailer = []string{"grpc-bar", "connection", "te", "content-length"}
)

// TestHandlerReservedAndConnectionMetadataNotStored verifies that when a
// handler sets reserved grpc- keys or connection-specific HTTP fields in
// its header and trailer, the first execution leaves them out of the
// record and says so (Event.DroppedMetadata, a warning from WithLogger),
// and the replay succeeds with the rest of the metadata intact: a record
// the library wrote itself never fails the hostile-record check.
func TestHandlerReservedAndConnectionMetadataNotStored(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
			h := metadata.Pairs("x-keep", "yes", "x-keep-bin", "\x00\xff")
			for _, k := range notStoredHeader {
				h.Append(k, "1")
			}
			tr := metadata.Pairs("x-trail", "kept")
			for _, k := range notStoredTrailer {
				tr.Append(k, "trailers")
			}
			if err := grpc.SetHeader(ctx, h); err != nil {
				return nil, err
			}
			if err := grpc.SetTrailer(ctx, tr); err != nil {
				return nil, err
			}
			return &testingv1.DoResponse{Execution: n}, nil
		}}
		log, logged := bufferLogger()
		env := newTestEnv(t, b.store, envConfig{svc: svc, opts: []Option{WithLogger(log)}})
		ctx := withKey(testCtx(t), "reserved-metadata")
		var h1, t1, h2, t2 metadata.MD
		first, err := env.client.Do(ctx, &testingv1.DoRequest{}, grpc.Header(&h1), grpc.Trailer(&t1))
		if err != nil {
			t.Fatalf("first call: %v", err)
		}
		again, err := env.client.Do(ctx, &testingv1.DoRequest{}, grpc.Header(&h2), grpc.Trailer(&t2))
		if err != nil {
			t.Fatalf("replay of a record the interceptor wrote itself: %v", err)
		}
		if n := env.svc.Runs.Load(); n != 1 || !Replayed(h2) || !proto.Equal(first, again) {
			t.Fatalf("runs = %d, replayed = %v, replay %v of %v; want 1 run and an identical replay", n, Replayed(h2), again, first)
		}
		// What grpc-go itself passed on the first time, for the record.
		t.Logf("first answer carried: header %v, trailer %v", presentKeys(h1, notStoredHeader), presentKeys(t1, notStoredTrailer))
		for _, k := range notStoredHeader {
			if v := h2.Get(k); v != nil {
				t.Errorf("replay header %s = %q: must not be stored", k, v)
			}
		}
		for _, k := range notStoredTrailer {
			if v := t2.Get(k); v != nil {
				t.Errorf("replay trailer %s = %q: must not be stored", k, v)
			}
		}
		for _, kv := range [][3]string{{"header", "x-keep", "yes"}, {"header", "x-keep-bin", "\x00\xff"}, {"trailer", "x-trail", "kept"}} {
			md := h2
			if kv[0] == "trailer" {
				md = t2
			}
			if got := md.Get(kv[1]); len(got) != 1 || got[0] != kv[2] {
				t.Errorf("replay %s %s = %q, want [%q]", kv[0], kv[1], got, kv[2])
			}
		}
		want := slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(notStoredHeader), notStoredTrailer...))))
		e, ok := env.events.last(OutcomeExecuted)
		if !ok || !slices.Equal(e.DroppedMetadata, want) {
			t.Errorf("executed event DroppedMetadata = %q (event found %v), want %q", e.DroppedMetadata, ok, want)
		}
		if e, _ := env.events.last(OutcomeReplayed); e.DroppedMetadata != nil {
			t.Errorf("replayed event DroppedMetadata = %q, want none: the record holds nothing to drop", e.DroppedMetadata)
		}
		out := logged.String()
		if !strings.Contains(out, "metadata not stored") || !strings.Contains(out, "grpc-retry-pushback-ms") || !strings.Contains(out, "transfer-encoding") {
			t.Errorf("the logger did not say which metadata was not stored:\n%s", out)
		}
		if strings.Count(out, "metadata not stored") != 1 {
			t.Errorf("want exactly one warning (the first execution's), got:\n%s", out)
		}
	})
}

func presentKeys(md metadata.MD, keys []string) []string {
	var out []string
	for _, k := range keys {
		if md.Get(k) != nil {
			out = append(out, k)
		}
	}
	return out
}

// TestOlderRecordConnectionMetadataNotReplayed verifies that a record
// written by an earlier version, which stored connection-specific HTTP
// fields the handler set, replays without them (and says so in the
// event), the rest of its metadata intact, rather than being refused.
func TestOlderRecordConnectionMetadataNotReplayed(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		env := newTestEnv(t, b.store, envConfig{})
		fp, err := DefaultFingerprint(methodDo, &testingv1.DoRequest{Id: "old"})
		if err != nil {
			t.Fatal(err)
		}
		resp, _ := deterministic.Marshal(&testingv1.DoResponse{Id: "old", Execution: 7})
		entry := func(k, v string) *idempotencyv1.MetadataEntry {
			return &idempotencyv1.MetadataEntry{Key: k, Values: [][]byte{[]byte(v)}}
		}
		rec, err := proto.Marshal(&idempotencyv1.Record{Version: recordVersion, State: idempotencyv1.Record_STATE_COMPLETED,
			Fingerprint: fp, Method: methodDo, Status: &idempotencyv1.Status{},
			ResponseType: "idempotency.testing.v1.DoResponse", Response: resp,
			Header:  []*idempotencyv1.MetadataEntry{entry("connection", "close"), entry("x-keep", "yes"), entry("content-length", "3"), entry("upgrade", "h2c")},
			Trailer: []*idempotencyv1.MetadataEntry{entry("transfer-encoding", "chunked"), entry("x-trail", "kept"), entry("keep-alive", "timeout=5")},
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx := withKey(testCtx(t), "older-record")
		if err := b.store.Complete(ctx, StoreKey(methodDo, "", "older-record"), "earlier-version", rec, DefaultTTL); err != nil {
			t.Fatalf("plant the record: %v", err)
		}
		var h, tr metadata.MD
		got, err := env.client.Do(ctx, &testingv1.DoRequest{Id: "old"}, grpc.Header(&h), grpc.Trailer(&tr))
		if err != nil {
			t.Fatalf("replay of an older record with connection-specific metadata: %v", err)
		}
		if got.GetExecution() != 7 || !Replayed(h) || env.svc.Runs.Load() != 0 {
			t.Fatalf("answer %v, replayed %v, runs %d; want the stored answer, replayed, no run", got, Replayed(h), env.svc.Runs.Load())
		}
		for _, k := range []string{"connection", "content-length", "upgrade", "transfer-encoding", "keep-alive"} {
			if h.Get(k) != nil || tr.Get(k) != nil {
				t.Errorf("%s replayed (header %q, trailer %q); want it left out", k, h.Get(k), tr.Get(k))
			}
		}
		if h.Get("x-keep") == nil || tr.Get("x-trail") == nil {
			t.Errorf("the rest of the metadata was lost: header %v, trailer %v", h, tr)
		}
		want := []string{"connection", "content-length", "keep-alive", "transfer-encoding", "upgrade"}
		if e, ok := env.events.last(OutcomeReplayed); !ok || !slices.Equal(e.DroppedMetadata, want) {
			t.Errorf("replayed event DroppedMetadata = %q (found %v), want %q", e.DroppedMetadata, ok, want)
		}
	})
}
