package idempotency

// Hostile input through the wire: keys grpc-go's own client refuses to send,
// written as raw HTTP/2 frames, and damaged records planted in a real Redis.

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency/idempotencytest/testservice"
	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
)

// rawAnswer is what a raw HTTP/2 gRPC call got back.
type rawAnswer struct {
	err error         // the gRPC status from the trailers, when there were any
	rst http2.ErrCode // RST_STREAM code, when the stream was reset
	ok  bool          // grpc-status 0
}

func (a rawAnswer) String() string {
	switch {
	case a.ok:
		return "OK"
	case a.err != nil:
		s := status.Code(a.err).String()
		if r := ReasonOf(a.err); r != "" {
			s += " " + r
		}
		return s
	default:
		return "RST_STREAM " + a.rst.String()
	}
}

// rawGRPCCall sends one unary call as raw HTTP/2 frames, with the header
// fields as given (no validation), and reads the answer.
func rawGRPCCall(t *testing.T, conn net.Conn, path string, fields []hpack.HeaderField, msg proto.Message) rawAnswer {
	t.Helper()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatalf("preface: %v", err)
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.MaxHeaderListSize = 16 << 20
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	base := []hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"}, {Name: ":path", Value: path},
		{Name: ":authority", Value: "bufnet"}, {Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"},
	}
	for _, f := range append(base, fields...) {
		if err := enc.WriteField(f); err != nil {
			t.Fatal(err)
		}
	}
	block := hb.Bytes()
	const chunk = 16 << 10 // the default SETTINGS_MAX_FRAME_SIZE
	first := block[:min(chunk, len(block))]
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: first, EndHeaders: len(block) <= chunk}); err != nil {
		t.Fatal(err)
	}
	for rest := block[len(first):]; len(rest) > 0; {
		n := min(chunk, len(rest))
		if err := fr.WriteContinuation(1, n == len(rest), rest[:n]); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	body, _ := proto.Marshal(msg)
	frame := append([]byte{0, 0, 0, 0, 0}, body...)
	frame[1], frame[2], frame[3], frame[4] = byte(len(body)>>24), byte(len(body)>>16), byte(len(body)>>8), byte(len(body))
	if err := fr.WriteData(1, true, frame); err != nil {
		// The server may have reset the stream before reading the body.
		t.Logf("write data: %v", err)
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("read frame: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				_ = fr.WritePing(true, f.Data)
			}
		case *http2.RSTStreamFrame:
			return rawAnswer{rst: f.ErrCode}
		case *http2.GoAwayFrame:
			return rawAnswer{rst: f.ErrCode}
		case *http2.MetaHeadersFrame:
			if !f.StreamEnded() {
				continue // response headers; the status comes in the trailers
			}
			code := f.PseudoValue("status")
			var st *status.Status
			for _, hf := range f.Fields {
				switch hf.Name {
				case "grpc-status":
					var c int
					fmt.Sscan(hf.Value, &c)
					st = status.New(codes.Code(c), "")
				case "grpc-status-details-bin":
					raw, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(hf.Value, "="))
					p := &spb.Status{}
					if err == nil && proto.Unmarshal(raw, p) == nil {
						st = status.FromProto(p)
					}
				}
			}
			if st == nil {
				t.Fatalf("trailers without grpc-status (HTTP %s): %v", code, f.Fields)
			}
			if st.Code() == codes.OK {
				return rawAnswer{ok: true}
			}
			return rawAnswer{err: st.Err()}
		}
	}
}

// TestHostileKeysOnTheWire sends keys that grpc-go's client would refuse or
// never produce, as raw HTTP/2, to a server on a real Redis: each gets a
// non-OK answer (its stated status when it reaches the interceptor, or a
// stream reset from the HTTP/2 layer), the handler never runs, nothing
// panics. A valid key in the same harness runs once and replays.
func TestHostileKeysOnTheWire(t *testing.T) {
	rc := newRedisClient(t, sharedRedisServer(t).Addr)
	var runs atomic.Int64
	svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		runs.Add(1)
		return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
	}}
	prefix := fmt.Sprintf("hostile:%d:", time.Now().UnixNano())
	gs := grpc.NewServer(grpc.UnaryInterceptor(UnaryServerInterceptor(NewRedisStore(rc, WithKeyPrefix(prefix)))))
	testingv1.RegisterTestServiceServer(gs, svc)
	lis := bufconn.Listen(4 << 20)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)

	key := func(v string) []hpack.HeaderField { return []hpack.HeaderField{{Name: DefaultKeyHeader, Value: v}} }
	for _, tc := range []struct {
		name   string
		fields []hpack.HeaderField
		path   string
		want   string // "OK", "<Code> <REASON>", or "RST" for any stream reset
	}{
		{"valid", key("raw-valid-1"), methodDo, "OK"},
		{"valid repeat", key("raw-valid-1"), methodDo, "OK"},
		{"empty", key(""), methodDo, "InvalidArgument KEY_INVALID"},
		{"256 bytes", key(strings.Repeat("k", 256)), methodDo, "InvalidArgument KEY_INVALID"},
		{"64 KiB", key(strings.Repeat("k", 64<<10)), methodDo, "InvalidArgument KEY_INVALID"},
		{"1 MiB", key(strings.Repeat("k", 1<<20)), methodDo, "InvalidArgument KEY_INVALID"},
		{"non-ASCII UTF-8", key("ключ"), methodDo, "InvalidArgument KEY_INVALID"},
		{"Latin-1 byte", key("caf\xe9"), methodDo, "InvalidArgument KEY_INVALID"},
		{"space inside", key("a b"), methodDo, "InvalidArgument KEY_INVALID"},
		{"tab inside", key("a\tb"), methodDo, "InvalidArgument KEY_INVALID"},
		{"NUL", key("a\x00b"), methodDo, "RST"},
		{"control 0x01", key("a\x01b"), methodDo, "RST"},
		{"CR LF", key("a\r\nx-injected: 1"), methodDo, "RST"},
		{"DEL", key("a\x7f"), methodDo, "RST"},
		{"two values", append(key("a"), key("b")...), methodDo, "InvalidArgument KEY_INVALID"},
		{"-bin variant", []hpack.HeaderField{{Name: DefaultKeyHeader + "-bin", Value: base64.RawStdEncoding.EncodeToString([]byte("abc"))}}, methodCharge, "InvalidArgument KEY_INVALID"},
		{"upper-case name", []hpack.HeaderField{{Name: "Idempotency-Key", Value: "abc"}}, methodDo, "RST"},
		{"required, missing", nil, methodCharge, "InvalidArgument KEY_REQUIRED"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := lis.Dial()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			before := runs.Load()
			var msg proto.Message = &testingv1.DoRequest{Id: "raw"}
			if tc.path == methodCharge {
				msg = &testingv1.ChargeRequest{Amount: 1}
			}
			got := rawGRPCCall(t, conn, tc.path, tc.fields, msg)
			ran := runs.Load() - before
			t.Logf("reliability: hostile key %s: %s (handler runs %d)", tc.name, got, ran)
			switch {
			case tc.want == "RST":
				if got.ok {
					t.Fatalf("got OK, want a refusal")
				}
			case got.String() != tc.want:
				t.Fatalf("got %s, want %s", got, tc.want)
			}
			wantRuns := int64(0)
			if tc.name == "valid" {
				wantRuns = 1
			}
			if ran != wantRuns {
				t.Fatalf("handler ran %d times, want %d", ran, wantRuns)
			}
		})
	}

	// The same 1 MiB key through grpc-go's own client.
	client := testservice.Dial(t, lis)
	before := runs.Load()
	ctx := metadata.AppendToOutgoingContext(testCtx(t), DefaultKeyHeader, strings.Repeat("k", 1<<20))
	_, err := client.Do(ctx, &testingv1.DoRequest{Id: "big"})
	if status.Code(err) == codes.OK || runs.Load() != before {
		t.Fatalf("1 MiB key through grpc-go: %v, handler runs %d; want a refusal and no run", err, runs.Load()-before)
	}
	t.Logf("reliability: hostile key 1 MiB through grpc-go's client: %s %s", status.Code(err), ReasonOf(err))
}

// TestHostileRecordsInRedis plants damaged or foreign records in a real
// Redis, beyond TestCorruptRecord's, and checks each repeat gets its stated
// answer without running the handler or panicking.
func TestHostileRecordsInRedis(t *testing.T) {
	rc := newRedisClient(t, sharedRedisServer(t).Addr)
	ctx := testCtx(t)
	prefix := fmt.Sprintf("hostile-rec:%d:", time.Now().UnixNano())
	env := newTestEnv(t, NewRedisStore(rc, WithKeyPrefix(prefix)), envConfig{outer: []grpc.UnaryServerInterceptor{recoverInterceptor}})
	req := &testingv1.DoRequest{Id: "x"}
	fp, _ := DefaultFingerprint(methodDo, req)
	other, _ := DefaultFingerprint(methodDo, &testingv1.DoRequest{Id: "y"})
	enc := func(r *idempotencyv1.Record) []byte {
		b, err := proto.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	completed := func(mod func(r *idempotencyv1.Record)) []byte {
		resp, _ := deterministic.Marshal(&testingv1.DoResponse{Id: "x", Execution: 7})
		r := &idempotencyv1.Record{Version: recordVersion, State: idempotencyv1.Record_STATE_COMPLETED, Fingerprint: fp,
			Method: methodDo, Status: &idempotencyv1.Status{}, ResponseType: "idempotency.testing.v1.DoResponse", Response: resp}
		mod(r)
		return enc(r)
	}
	type plant func(storeKey string)
	hset := func(rec []byte) plant {
		return func(k string) {
			if err := rc.HSet(ctx, prefix+k, "rec", rec).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	// put plants rec in the layout the store writes today; hset in layout
	// 1, written by earlier versions.
	put := func(rec []byte) plant {
		return func(k string) {
			v, err := layoutValue(stateCompleted, "planted", rec)
			if err != nil {
				t.Fatal(err)
			}
			if err := rc.Set(ctx, prefix+k, v, 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	raw := func(v string) plant {
		return func(k string) {
			if err := rc.Set(ctx, prefix+k, v, 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	valid := string(completed(func(*idempotencyv1.Record) {}))
	for _, tc := range []struct {
		name  string
		plant plant
		want  string
	}{
		{"layout 1, valid completed (control)", hset(completed(func(*idempotencyv1.Record) {})), "OK"},
		{"layout 1, another method's record", hset(completed(func(r *idempotencyv1.Record) { r.Method = methodCharge })), "DataLoss RECORD_CORRUPT"},
		{"layout 1, in progress, other request", hset(enc(&idempotencyv1.Record{Version: recordVersion,
			State: idempotencyv1.Record_STATE_IN_PROGRESS, Fingerprint: other, Method: methodDo})), "FailedPrecondition KEY_REUSED"},
		{"a hash without a record", func(k string) { rc.HSet(ctx, prefix+k, "x", "y") }, "DataLoss RECORD_CORRUPT"},
		{"another layout byte", raw("\x04D\x00" + valid), "DataLoss RECORD_CORRUPT"},
		{"layout 2, valid completed (control)", raw("\x02D\x01t" + valid), "OK"},
		{"layout 3, header only", raw("\x03D\x00"), "DataLoss RECORD_CORRUPT"},
		{"layout 3, fence cut short", raw("\x03D\x01t\x00\x00\x00"), "DataLoss RECORD_CORRUPT"},
		{"layout 3, no record after the fence", raw("\x03D\x01t\x00\x00\x00\x00\x00\x00\x00\x01"), "DataLoss RECORD_CORRUPT"},
		{"layout 2, header only", raw("\x02D\x00"), "DataLoss RECORD_CORRUPT"},
		{"layout 2, unknown state", raw("\x02X\x01t" + valid), "DataLoss RECORD_CORRUPT"},
		{"layout 2, token length past the end", raw("\x02D\xffabc"), "DataLoss RECORD_CORRUPT"},
		{"valid completed (control)", put(completed(func(*idempotencyv1.Record) {})), "OK"},
		{"another method's record", put(completed(func(r *idempotencyv1.Record) { r.Method = methodCharge })), "DataLoss RECORD_CORRUPT"},
		{"another registered response type", put(completed(func(r *idempotencyv1.Record) {
			r.ResponseType = "idempotency.testing.v1.ChargeResponse"
		})), "DataLoss RECORD_CORRUPT"},
		{"response bytes not a DoResponse", put(completed(func(r *idempotencyv1.Record) { r.Response = []byte{0xff, 0xff, 0xff} })), "DataLoss RECORD_CORRUPT"},
		{"no fingerprint", put(completed(func(r *idempotencyv1.Record) { r.Fingerprint = nil })), "DataLoss RECORD_CORRUPT"},
		{"other request's fingerprint", put(completed(func(r *idempotencyv1.Record) { r.Fingerprint = other })), "FailedPrecondition KEY_REUSED"},
		{"unknown state", put(completed(func(r *idempotencyv1.Record) { r.State = 42 })), "DataLoss RECORD_CORRUPT"},
		{"completed without status", put(completed(func(r *idempotencyv1.Record) { r.Status = nil })), "DataLoss RECORD_CORRUPT"},
		{"stored error code 999", put(completed(func(r *idempotencyv1.Record) {
			r.Status = &idempotencyv1.Status{Code: 999, Message: "from the future"}
		})), "DataLoss RECORD_CORRUPT"},
		{"header key with a space", put(completed(func(r *idempotencyv1.Record) {
			r.Header = []*idempotencyv1.MetadataEntry{{Key: "bad key", Values: [][]byte{[]byte("v")}}}
		})), "DataLoss RECORD_CORRUPT"},
		{"trailer value with a newline", put(completed(func(r *idempotencyv1.Record) {
			r.Trailer = []*idempotencyv1.MetadataEntry{{Key: "x-t", Values: [][]byte{[]byte("a\r\nb")}}}
		})), "DataLoss RECORD_CORRUPT"},
		{"in progress, other request", put(enc(&idempotencyv1.Record{Version: recordVersion,
			State: idempotencyv1.Record_STATE_IN_PROGRESS, Fingerprint: other, Method: methodDo})), "FailedPrecondition KEY_REUSED"},
		{"in progress, same request", put(enc(&idempotencyv1.Record{Version: recordVersion,
			State: idempotencyv1.Record_STATE_IN_PROGRESS, Fingerprint: fp, Method: methodDo})), "Aborted KEY_IN_PROGRESS"},
		{"a string, not a record", func(k string) { rc.Set(ctx, prefix+k, "plain string", 0) }, "DataLoss RECORD_CORRUPT"},
		{"a list, not a record", func(k string) { rc.RPush(ctx, prefix+k, "a", "b") }, "DataLoss RECORD_CORRUPT"},
		{"5 MB of garbage", put(bytes.Repeat([]byte{0xff}, 5<<20)), "DataLoss RECORD_CORRUPT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := "hostile-" + strings.NewReplacer(" ", "-", ",", "", "'", "").Replace(tc.name)
			tc.plant(StoreKey(methodDo, "", k))
			before := env.svc.Runs.Load()
			resp, err := env.client.Do(withKey(ctx, k), req)
			got := "OK"
			if err != nil {
				got = status.Code(err).String()
				if r := ReasonOf(err); r != "" {
					got += " " + r
				}
			}
			t.Logf("reliability: hostile record %s: %s (%v)", tc.name, got, err)
			switch tc.want {
			case "any":
			case "non-OK":
				if err == nil {
					t.Fatalf("got OK %v, want an error", resp)
				}
			default:
				if got != tc.want {
					t.Fatalf("got %s (%v), want %s", got, err, tc.want)
				}
			}
			if tc.want == "OK" && resp.GetExecution() != 7 {
				t.Fatalf("replay = %v, want the planted execution 7", resp)
			}
			if n := env.svc.Runs.Load() - before; n != 0 {
				t.Fatalf("handler ran %d times", n)
			}
		})
	}

	// Every fuzz seed, planted: whatever the answer, no run and no panic.
	for i, rec := range fuzzRecordSeeds(t) {
		k := fmt.Sprintf("seed-%d", i)
		if i%2 == 0 {
			put(rec)(StoreKey(methodDo, "", k))
		} else {
			hset(rec)(StoreKey(methodDo, "", k))
		}
		before := env.svc.Runs.Load()
		_, err := env.client.Do(withKey(ctx, k), req)
		if n := env.svc.Runs.Load() - before; n != 0 {
			t.Fatalf("seed %d: handler ran %d times (answer %v)", i, n, err)
		}
		if status.Code(err) == codes.Internal && strings.Contains(err.Error(), "panic") {
			t.Fatalf("seed %d: %v", i, err)
		}
	}
}
