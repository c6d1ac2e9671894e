package idempotency

import (
	"fmt"
	"strings"
	"unicode/utf8"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// recordVersion is the layout version written into every record. Readers
// refuse records of other versions as corrupt rather than misreading them.
const recordVersion = 1

// FingerprintFunc computes the fingerprint that binds a key to one request:
// a repeat whose fingerprint differs from the first call's is refused with
// FailedPrecondition (reason KEY_REUSED). fullMethod is the gRPC method; req
// is the request message.
type FingerprintFunc func(fullMethod string, req any) ([]byte, error)

var deterministic = proto.MarshalOptions{Deterministic: true}

// DefaultFingerprint is the SHA-256 of the deterministic protobuf encoding of
// req. Requests that are not protobuf messages cannot be fingerprinted; use
// [WithFingerprint] for other codecs.
func DefaultFingerprint(_ string, req any) ([]byte, error) {
	m, ok := req.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("idempotency: request of type %T is not a protobuf message", req)
	}
	return fingerprintProto(m)
}

// decodeRecord parses a stored record, refusing anything that is not a
// complete record of a known version and state.
func decodeRecord(b []byte) (*idempotencyv1.Record, error) {
	rec := &idempotencyv1.Record{}
	if err := proto.Unmarshal(b, rec); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorruptRecord, err)
	}
	if rec.GetVersion() != recordVersion {
		return nil, fmt.Errorf("%w: version %d, want %d", ErrCorruptRecord, rec.GetVersion(), recordVersion)
	}
	switch rec.GetState() {
	case idempotencyv1.Record_STATE_IN_PROGRESS, idempotencyv1.Record_STATE_TOO_LARGE:
	case idempotencyv1.Record_STATE_COMPLETED:
		if rec.GetStatus() == nil {
			return nil, fmt.Errorf("%w: completed record without status", ErrCorruptRecord)
		}
	default:
		return nil, fmt.Errorf("%w: state %d", ErrCorruptRecord, rec.GetState())
	}
	if len(rec.GetFingerprint()) == 0 {
		return nil, fmt.Errorf("%w: no fingerprint", ErrCorruptRecord)
	}
	if c := rec.GetStatus().GetCode(); c < 0 || c > maxCode {
		return nil, fmt.Errorf("%w: status code %d", ErrCorruptRecord, c)
	}
	for _, md := range [][]*idempotencyv1.MetadataEntry{rec.GetHeader(), rec.GetTrailer()} {
		if err := checkMetadata(md); err != nil {
			return nil, err
		}
	}
	return rec, nil
}

// maxCode is the largest gRPC status code (Unauthenticated).
const maxCode = 16

// checkMetadata refuses stored metadata that gRPC could not send (see
// checkEntry).
func checkMetadata(entries []*idempotencyv1.MetadataEntry) error {
	for _, e := range entries {
		if err := checkEntry(e); err != nil {
			return err
		}
	}
	return nil
}

// checkEntry refuses a metadata entry gRPC could not deliver: a key outside
// [0-9a-z_.-] or reserved ("grpc-"), or a value of a non-binary key with a
// control character other than tab. grpc-go's server sends any other value
// byte for byte (UTF-8 such as "café" included) and its client accepts it,
// so those are stored and replayed as sent; a control character makes the
// client's HTTP/2 layer refuse the whole response, so such a value never
// reached the client the first time.
// metadataKeyChars reports whether k holds only the characters gRPC allows
// in a metadata key: 0-9 a-z - _ .
func metadataKeyChars(k string) bool {
	for i := 0; i < len(k); i++ {
		if c := k[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

func checkEntry(e *idempotencyv1.MetadataEntry) error {
	k := e.GetKey()
	if k == "" || strings.HasPrefix(k, "grpc-") || !metadataKeyChars(k) {
		return fmt.Errorf("%w: metadata key %q", ErrCorruptRecord, k)
	}
	if strings.HasSuffix(k, "-bin") {
		return nil
	}
	for _, v := range e.GetValues() {
		for _, c := range v {
			if (c < 0x20 && c != '\t') || c == 0x7f {
				return fmt.Errorf("%w: value of metadata key %q", ErrCorruptRecord, k)
			}
		}
	}
	return nil
}

// connectionSpecific reports whether k names an HTTP header field that
// belongs to one connection or one message's framing, not to the call:
// the connection-specific fields of RFC 9110 section 7.6.1 (RFC 9113
// section 8.2.2 makes them malformed in HTTP/2), proxy-connection,
// content-length, and trailer, which announces the trailer fields of one
// message. Each transport writes its own; a stored copy replayed through
// another transport (a record written through Connect over HTTP/1.1 and
// replayed through grpc-go over HTTP/2, or the reverse) would describe a
// connection and a body that are not the replay's.
func connectionSpecific(k string) bool {
	switch k {
	case "connection", "content-length", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade":
		return true
	}
	return false
}

// mdToEntries converts captured metadata for storage. It keeps only what
// gRPC can send (see checkEntry), so every stored record passes
// decodeRecord, and leaves out the connection-specific HTTP fields (see
// connectionSpecific); it returns the keys it left out, for the call's
// [Event.DroppedMetadata]. A reserved "grpc-" key that grpc-go passes on
// (grpc-retry-pushback-ms, or any other than the ones it writes itself) is
// left out with them: a record holding one is refused on replay.
func mdToEntries(md metadata.MD) (entries []*idempotencyv1.MetadataEntry, dropped []string) {
	if len(md) == 0 {
		return nil, nil
	}
	out := make([]*idempotencyv1.MetadataEntry, 0, len(md))
	for k, vs := range md {
		e := &idempotencyv1.MetadataEntry{Key: k, Values: make([][]byte, 0, len(vs))}
		for _, v := range vs {
			e.Values = append(e.Values, []byte(v))
		}
		if connectionSpecific(k) || checkEntry(e) != nil {
			dropped = append(dropped, k)
			continue
		}
		out = append(out, e)
	}
	return out, dropped
}

// entriesToMD converts stored metadata for a replay. It leaves out the
// connection-specific HTTP fields that earlier versions stored (see
// connectionSpecific), reporting their keys in dropped. The map has room
// for extra more keys (the replay marker).
func entriesToMD(entries []*idempotencyv1.MetadataEntry, extra int) (md metadata.MD, dropped []string) {
	md = make(metadata.MD, len(entries)+extra)
	for _, e := range entries {
		if connectionSpecific(e.GetKey()) {
			dropped = append(dropped, e.GetKey())
			continue
		}
		for _, v := range e.GetValues() {
			md[e.GetKey()] = append(md[e.GetKey()], string(v))
		}
	}
	return md, dropped
}

// wireStatus returns a status as grpc-go puts it on the wire, which is what
// the client of a first execution receives, so that a replay is identical.
// grpc-go percent-encodes the message rune by rune, turning each byte that
// is not valid UTF-8 into U+FFFD; and it drops the details when it cannot
// encode the status (a message or type URL that is not valid UTF-8).
func wireStatus(st *status.Status) *idempotencyv1.Status {
	p := st.Proto()
	out := &idempotencyv1.Status{Code: p.GetCode(), Message: wireMessage(p.GetMessage())}
	if len(p.GetDetails()) > 0 {
		if _, err := proto.Marshal(p); err == nil {
			out.Details = p.GetDetails()
		}
	}
	return out
}

// wireMessage is msg with every byte that is not part of valid UTF-8
// replaced by U+FFFD, one per byte, as grpc-go's grpc-message encoding does.
func wireMessage(msg string) string {
	if utf8.ValidString(msg) {
		return msg
	}
	var b strings.Builder
	for len(msg) > 0 {
		r, size := utf8.DecodeRuneInString(msg)
		if r == utf8.RuneError && size == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(msg[:size])
		}
		msg = msg[size:]
	}
	return b.String()
}
