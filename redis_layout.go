// How a RedisStore lays a record out in Redis.

package idempotency

import (
	"encoding/binary"
	"fmt"
)

// Layout 3, written since issue 26: each record is one Redis string,
//
//	byte 0      3 (the layout)
//	byte 1      the state: 'I' in progress, 'D' completed, 'F' a fence left
//	            by a forget (see forget.lua)
//	byte 2      n, the length of the owner token (at most 255)
//	bytes 3..   the owner token (of the claim, or of the call that
//	            completed the record: a retried Complete recognises itself)
//	8 bytes     the owner's fencing token, big-endian: written by the
//	            claim script (see claim.lua) in an in-progress value and
//	            copied into a forget's fence; 0 in a completed value
//	the rest    the encoded record (none for a fence)
//
// Layout 2, written by issue 14's version, is layout 3 without the fence.
// Layout 1, written before, is a hash (fields tok, rec, done, fenced). The
// scripts read and act on all three, so records stored by earlier versions
// keep working until they expire; every new write is in layout 3. The token
// sits at the same place in layouts 2 and 3, so the scripts that only
// compare tokens (renew, complete, release) read both alike. A string costs
// Redis less memory and less work than a hash: no field names and no hash
// table (a record's value is larger than hash-max-listpack-value, so each
// layout-1 hash was a hash table). See docs/PERFORMANCE.md, "Capacity".
const (
	layout2 = 2
	layout3 = 3

	stateInProgress = 'I'
	stateCompleted  = 'D'

	// maxTokenLen is the longest owner token layouts 2 and 3 can hold.
	maxTokenLen = 255
	// fenceLen is the length of a layout-3 fence.
	fenceLen = 8
)

// layoutValue returns the layout-3 value of a record in state, owned by (or
// completed by) token, with fence 0 (the claim script writes the fence of
// an in-progress value).
func layoutValue(state byte, token string, record []byte) ([]byte, error) {
	if len(token) > maxTokenLen {
		return nil, fmt.Errorf("idempotency: redis: an owner token of %d bytes; the store keeps at most %d", len(token), maxTokenLen)
	}
	v := make([]byte, 3+len(token)+fenceLen+len(record))
	v[0], v[1], v[2] = layout3, state, byte(len(token))
	n := copy(v[3:], token)
	copy(v[3+n+fenceLen:], record)
	return v, nil
}

// layoutRecord returns the record held in a layout-2 or layout-3 value and
// its owner's fence (0 in layout 2, or when the value is completed),
// refusing one that is not a record in progress or completed.
func layoutRecord(v string) ([]byte, uint64, error) {
	if len(v) < 3 || (v[0] != layout2 && v[0] != layout3) {
		return nil, 0, fmt.Errorf("%w: the redis value is not a record (layout byte %q)", ErrCorruptRecord, firstByte(v))
	}
	if v[1] != stateInProgress && v[1] != stateCompleted {
		return nil, 0, fmt.Errorf("%w: the redis value has state %q", ErrCorruptRecord, v[1])
	}
	n := 3 + int(v[2])
	var fence uint64
	if v[0] == layout3 {
		if len(v) < n+fenceLen {
			return nil, 0, fmt.Errorf("%w: the redis value ends inside its %d-byte header", ErrCorruptRecord, n+fenceLen)
		}
		fence = binary.BigEndian.Uint64([]byte(v[n : n+fenceLen]))
		n += fenceLen
	}
	if len(v) <= n {
		return nil, 0, fmt.Errorf("%w: the redis value ends after its %d-byte header", ErrCorruptRecord, len(v))
	}
	return []byte(v[n:]), fence, nil
}

func firstByte(v string) string {
	if v == "" {
		return ""
	}
	return v[:1]
}
