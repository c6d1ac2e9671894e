package idempotency

import (
	"bytes"
	"strings"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The hand-written in-progress encoding is byte for byte proto.Marshal's.
func TestEncodeInProgressMatchesProtoMarshal(t *testing.T) {
	fp := bytes.Repeat([]byte{0xab}, 32)
	for _, tc := range []struct {
		name          string
		fp            []byte
		method, token string
		created       time.Time
	}{
		{"usual", fp, "/pkg.Service/Method", newToken(), time.Date(2026, 11, 30, 4, 5, 6, 789, time.UTC)},
		{"whole second", fp, "/pkg.Service/Method", "t", time.Unix(1700000000, 0)},
		{"epoch", fp, "/m", "t", time.Unix(0, 0)},
		{"before the epoch", fp, "/m", "t", time.Unix(-5, 3)},
		{"empty parts", nil, "", "", time.Unix(0, 1)},
		{"long method", fp, "/" + strings.Repeat("é", 200), newToken(), time.Now()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want, err := proto.Marshal(&idempotencyv1.Record{
				Version:     recordVersion,
				State:       idempotencyv1.Record_STATE_IN_PROGRESS,
				Fingerprint: tc.fp,
				Method:      tc.method,
				CreateTime:  timestamppb.New(tc.created),
				LeaseToken:  tc.token,
			})
			if err != nil {
				t.Fatal(err)
			}
			got := encodeInProgress(tc.fp, tc.method, tc.created, tc.token)
			if !bytes.Equal(got, want) {
				t.Fatalf("encodeInProgress =\n%x\nproto.Marshal =\n%x", got, want)
			}
			if len(got) != cap(got) {
				t.Errorf("buffer of %d bytes for %d: the size computation is off", cap(got), len(got))
			}
		})
	}
}

// A completed record encoded with its response in place decodes to the
// record proto.Marshal would have written, and rec.Response is that
// response's deterministic encoding.
func TestEncodeWithResponse(t *testing.T) {
	for _, resp := range []*testingv1.DoResponse{
		{Id: "r1", Execution: 7, Payload: bytes.Repeat([]byte("x"), 70_000)},
		{}, // an empty response: no response field, as proto.Marshal
	} {
		rec := &idempotencyv1.Record{
			Version:      recordVersion,
			State:        idempotencyv1.Record_STATE_COMPLETED,
			Fingerprint:  []byte("fp"),
			Method:       "/m",
			Status:       &idempotencyv1.Status{Code: 0},
			ResponseType: "idempotency.testing.v1.DoResponse",
			CompleteTime: timestamppb.Now(),
		}
		b, err := encodeWithResponse(rec, resp)
		if err != nil {
			t.Fatal(err)
		}
		wantResp, err := deterministic.Marshal(resp)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(rec.GetResponse(), wantResp) {
			t.Fatalf("rec.Response is not the response's deterministic encoding")
		}
		got, err := decodeRecord(b)
		if err != nil {
			t.Fatal(err)
		}
		want := proto.Clone(rec).(*idempotencyv1.Record)
		want.Response = wantResp
		if !proto.Equal(got, want) {
			t.Fatalf("decoded %v, want %v", got, want)
		}
		if len(b) != cap(b) {
			t.Errorf("buffer of %d bytes for %d: the size computation is off", cap(b), len(b))
		}
	}
}
