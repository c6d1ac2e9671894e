// Encodings on the hot path, written to cost one buffer each: the
// in-progress record every claim sends, the completed record, and the
// request encoding the fingerprint hashes.

package idempotency

import (
	"crypto/sha256"
	"fmt"
	"sync"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Field numbers of idempotency.v1.Record and google.protobuf.Timestamp used
// by the hand encoders below (record_encode_test.go checks them against
// proto.Marshal).
const (
	fieldVersion     protowire.Number = 1
	fieldState       protowire.Number = 2
	fieldFingerprint protowire.Number = 3
	fieldMethod      protowire.Number = 4
	fieldResponse    protowire.Number = 6
	fieldCreateTime  protowire.Number = 10
	fieldLeaseToken  protowire.Number = 13

	fieldSeconds protowire.Number = 1
	fieldNanos   protowire.Number = 2
)

// encodeInProgress returns the in-progress record a claim writes, byte for
// byte what proto.Marshal makes of the same idempotencyv1.Record, in one
// allocation.
func encodeInProgress(fp []byte, method string, created time.Time, token string) []byte {
	secs, nanos := created.Unix(), int32(created.Nanosecond())
	ts := 0
	if secs != 0 {
		ts += protowire.SizeTag(fieldSeconds) + protowire.SizeVarint(uint64(secs))
	}
	if nanos != 0 {
		ts += protowire.SizeTag(fieldNanos) + protowire.SizeVarint(uint64(nanos))
	}
	size := protowire.SizeTag(fieldVersion) + protowire.SizeVarint(recordVersion) +
		protowire.SizeTag(fieldState) + protowire.SizeVarint(uint64(idempotencyv1.Record_STATE_IN_PROGRESS)) +
		protowire.SizeTag(fieldCreateTime) + protowire.SizeBytes(ts)
	if len(fp) > 0 {
		size += protowire.SizeTag(fieldFingerprint) + protowire.SizeBytes(len(fp))
	}
	if method != "" {
		size += protowire.SizeTag(fieldMethod) + protowire.SizeBytes(len(method))
	}
	if token != "" {
		size += protowire.SizeTag(fieldLeaseToken) + protowire.SizeBytes(len(token))
	}
	b := make([]byte, 0, size)
	b = protowire.AppendTag(b, fieldVersion, protowire.VarintType)
	b = protowire.AppendVarint(b, recordVersion)
	b = protowire.AppendTag(b, fieldState, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(idempotencyv1.Record_STATE_IN_PROGRESS))
	if len(fp) > 0 {
		b = protowire.AppendTag(b, fieldFingerprint, protowire.BytesType)
		b = protowire.AppendBytes(b, fp)
	}
	if method != "" {
		b = protowire.AppendTag(b, fieldMethod, protowire.BytesType)
		b = protowire.AppendString(b, method)
	}
	b = protowire.AppendTag(b, fieldCreateTime, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(ts))
	if secs != 0 {
		b = protowire.AppendTag(b, fieldSeconds, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(secs))
	}
	if nanos != 0 {
		b = protowire.AppendTag(b, fieldNanos, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(nanos))
	}
	if token != "" {
		b = protowire.AppendTag(b, fieldLeaseToken, protowire.BytesType)
		b = protowire.AppendString(b, token)
	}
	return b
}

// encodeWithResponse encodes rec, whose Response must be unset, followed by
// the deterministic encoding of resp as its response field, written
// straight into the record's buffer: the response is encoded once and not
// copied. It sets rec.Response to that part of the buffer, so rec and the
// returned bytes describe the same record and must not be modified.
func encodeWithResponse(rec *idempotencyv1.Record, resp proto.Message) ([]byte, error) {
	n := deterministic.Size(resp)
	size := proto.Size(rec)
	if n > 0 {
		size += protowire.SizeTag(fieldResponse) + protowire.SizeBytes(n)
	}
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(make([]byte, 0, size), rec)
	if err != nil {
		return nil, fmt.Errorf("idempotency: encode record: %w", err)
	}
	if n == 0 {
		// proto.Marshal leaves an empty bytes field out; so does this.
		return b, nil
	}
	b = protowire.AppendTag(b, fieldResponse, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(n))
	start := len(b)
	if b, err = deterministic.MarshalAppend(b, resp); err != nil {
		return nil, fmt.Errorf("idempotency: encode response: %w", err)
	}
	if len(b)-start != n {
		// The handler changed the response while it was being encoded.
		return nil, fmt.Errorf("idempotency: encode response: its size changed from %d to %d bytes during encoding", n, len(b)-start)
	}
	rec.Response = b[start:len(b):len(b)]
	return b, nil
}

// fingerprintBufs holds request-encoding buffers for DefaultFingerprint:
// only the hash of the encoding is kept.
var fingerprintBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledFingerprintBuf: larger buffers are not kept, so a rare huge
// request does not pin its buffer; up to it (a 1 MiB request's encoding
// included), at most one buffer per P stays pooled until the GC drops it.
const maxPooledFingerprintBuf = 2 << 20

func fingerprintProto(m proto.Message) ([]byte, error) {
	bp := fingerprintBufs.Get().(*[]byte)
	b, err := deterministic.MarshalAppend((*bp)[:0], m)
	if err != nil {
		fingerprintBufs.Put(bp)
		return nil, fmt.Errorf("idempotency: encode request: %w", err)
	}
	sum := sha256.Sum256(b)
	if cap(b) <= maxPooledFingerprintBuf {
		*bp = b
		fingerprintBufs.Put(bp)
	}
	return sum[:], nil
}
