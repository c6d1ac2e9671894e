package idempotency

// Fuzz targets for the two inputs an attacker or a damaged store controls:
// the key (metadata) and the stored record. `go test` runs the seed corpus;
// `go test -fuzz=FuzzDecodeRecord -fuzztime=30s .` explores further.

import (
	"context"
	"errors"
	"strings"
	"testing"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

func fuzzKeySeeds() []string {
	return []string{
		"", "a", "key-1", "!~", "a b", "a\tb", "a\x00", "a\x7f", "ключ", "\xff\xfe",
		strings.Repeat("k", 255), strings.Repeat("k", 256), "550e8400-e29b-41d4-a716-446655440000",
		"with\r\nnewline", "idempotency-key", "\x21\x7e\x20",
	}
}

// FuzzValidateKey checks that ValidateKey accepts exactly the keys of 1 to
// 255 visible ASCII bytes, and every refusal wraps ErrInvalidKey.
func FuzzValidateKey(f *testing.F) {
	for _, k := range fuzzKeySeeds() {
		f.Add(k)
	}
	f.Fuzz(func(t *testing.T, key string) {
		err := ValidateKey(key)
		want := len(key) >= 1 && len(key) <= MaxKeyLength
		for i := 0; want && i < len(key); i++ {
			want = key[i] >= 0x21 && key[i] <= 0x7e
		}
		if (err == nil) != want {
			t.Fatalf("ValidateKey(%q) = %v, want ok=%v", key, err, want)
		}
		if err != nil && !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("ValidateKey(%q) error %v does not wrap ErrInvalidKey", key, err)
		}
	})
}

// FuzzKeyFromMetadata checks the key extraction from request metadata:
// absent only when neither the header nor its -bin variant is there, exactly
// one valid value or an ErrInvalidKey error, never a panic.
func FuzzKeyFromMetadata(f *testing.F) {
	for i, k := range fuzzKeySeeds() {
		f.Add(k, "other", uint8(i%3), i%4 == 0)
	}
	f.Fuzz(func(t *testing.T, v1, v2 string, n uint8, bin bool) {
		md := metadata.MD{}
		vals := []string{v1, v2, v1}[:int(n)%4]
		if len(vals) > 0 {
			md[DefaultKeyHeader] = vals
		}
		if bin {
			md[DefaultKeyHeader+"-bin"] = []string{v2}
		}
		key, present, err := keyFromMetadata(md, DefaultKeyHeader)
		switch {
		case len(vals) == 0 && !bin:
			if present || err != nil || key != "" {
				t.Fatalf("no key header: got %q, %v, %v", key, present, err)
			}
		case err != nil:
			if !present || !errors.Is(err, ErrInvalidKey) || key != "" {
				t.Fatalf("refused key: got %q, %v, %v; want present, ErrInvalidKey, no key", key, present, err)
			}
		default:
			if !present || len(vals) != 1 || key != vals[0] || ValidateKey(key) != nil {
				t.Fatalf("accepted %q (present %v) from %q (bin %v)", key, present, vals, bin)
			}
		}
	})
}

// fuzzRecordSeeds are valid records of every state, plus damaged ones.
func fuzzRecordSeeds(t testing.TB) [][]byte {
	fp, err := DefaultFingerprint(methodDo, &testingv1.DoRequest{Id: "x"})
	if err != nil {
		t.Fatal(err)
	}
	resp, _ := deterministic.Marshal(&testingv1.DoResponse{Id: "x", Execution: 1, Payload: []byte("p")})
	detail, _ := anypb.New(&errdetails.ResourceInfo{ResourceName: "acct"})
	recs := []*idempotencyv1.Record{
		{Version: recordVersion, State: idempotencyv1.Record_STATE_IN_PROGRESS, Fingerprint: fp, Method: methodDo},
		{Version: recordVersion, State: idempotencyv1.Record_STATE_COMPLETED, Fingerprint: fp, Method: methodDo,
			Status: &idempotencyv1.Status{}, ResponseType: "idempotency.testing.v1.DoResponse", Response: resp,
			Header:  []*idempotencyv1.MetadataEntry{{Key: "x-charge", Values: [][]byte{[]byte("ch_1")}}},
			Trailer: []*idempotencyv1.MetadataEntry{{Key: "x-bin-bin", Values: [][]byte{{0, 0xff}}}}},
		{Version: recordVersion, State: idempotencyv1.Record_STATE_COMPLETED, Fingerprint: fp, Method: methodDo,
			Status: &idempotencyv1.Status{Code: 5, Message: "not found", Details: []*anypb.Any{detail}}},
		{Version: recordVersion, State: idempotencyv1.Record_STATE_TOO_LARGE, Fingerprint: fp, Method: methodDo, ResponseSize: 1 << 21},
		{Version: recordVersion, State: idempotencyv1.Record_STATE_COMPLETED, Fingerprint: fp, Method: methodDo,
			Status: &idempotencyv1.Status{}, ResponseType: "no.such.Message", Response: []byte{1}},
		{Version: 2, State: idempotencyv1.Record_STATE_COMPLETED, Fingerprint: fp, Method: methodDo},
	}
	var out [][]byte
	for _, r := range recs {
		b, err := proto.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b, b[:len(b)/2], b[:len(b)-1])
	}
	return append(out, nil, []byte("\xff\xff\xff garbage"), []byte{0x08, 0x01}, []byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f})
}

// FuzzDecodeRecord checks that decoding a stored record never panics, that
// a record it accepts is complete and survives a re-encoding, and that
// answering a repeat from it never panics either.
func FuzzDecodeRecord(f *testing.F) {
	for _, b := range fuzzRecordSeeds(f) {
		f.Add(b)
	}
	s := &server{o: evaluateOptions(nil)}
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := decodeRecord(b)
		if err != nil {
			if rec != nil || !errors.Is(err, ErrCorruptRecord) {
				t.Fatalf("decodeRecord error %v (record %v): want nil record and ErrCorruptRecord", err, rec)
			}
			return
		}
		if rec.GetVersion() != recordVersion || len(rec.GetFingerprint()) == 0 {
			t.Fatalf("accepted record without version or fingerprint: %v", rec)
		}
		if rec.GetState() == idempotencyv1.Record_STATE_COMPLETED && rec.GetStatus() == nil {
			t.Fatalf("accepted completed record without status: %v", rec)
		}
		again, err := proto.Marshal(rec)
		if err != nil {
			t.Fatalf("re-encode an accepted record: %v", err)
		}
		rec2, err := decodeRecord(again)
		if err != nil || !proto.Equal(rec, rec2) {
			t.Fatalf("re-encoded record decodes to %v, %v; want %v", rec2, err, rec)
		}
		_, _ = entriesToMD(rec.GetHeader(), 0)
		if rec.GetState() == idempotencyv1.Record_STATE_COMPLETED {
			g := &grpcCall{ctx: context.Background()}
			g.call = call{method: methodDo, x: g}
			_, _ = s.replay(context.Background(), &g.call, rec)
		}
	})
}
