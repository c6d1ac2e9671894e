// How a RedisStore lays a record out in Redis.

package idempotency

import "fmt"

// Layout 2, written since issue 14: each record is one Redis string,
//
//	byte 0      2 (the layout)
//	byte 1      the state: 'I' in progress, 'D' completed, 'F' a fence left
//	            by a forget (see forget.lua)
//	byte 2      n, the length of the owner token (at most 255)
//	bytes 3..   the owner token (of the claim, or of the call that
//	            completed the record: a retried Complete recognises itself)
//	the rest    the encoded record (none for a fence)
//
// Layout 1, written before, is a hash (fields tok, rec, done, fenced). The
// scripts read and act on both, so records stored by earlier versions keep
// working until they expire; every new write is in layout 2. A string costs
// Redis less memory and less work than a hash: no field names and no hash
// table (a record's value is larger than hash-max-listpack-value, so each
// layout-1 hash was a hash table). See docs/PERFORMANCE.md, "Capacity".
const (
	layout2 = 2

	stateInProgress = 'I'
	stateCompleted  = 'D'

	// maxTokenLen is the longest owner token layout 2 can hold.
	maxTokenLen = 255
)

// layoutValue returns the layout-2 value of a record in state, owned by (or
// completed by) token.
func layoutValue(state byte, token string, record []byte) ([]byte, error) {
	if len(token) > maxTokenLen {
		return nil, fmt.Errorf("idempotency: redis: an owner token of %d bytes; the store keeps at most %d", len(token), maxTokenLen)
	}
	v := make([]byte, 3+len(token)+len(record))
	v[0], v[1], v[2] = layout2, state, byte(len(token))
	n := copy(v[3:], token)
	copy(v[3+n:], record)
	return v, nil
}

// layoutRecord returns the record held in a layout-2 value, refusing one
// that is not a record in progress or completed.
func layoutRecord(v string) ([]byte, error) {
	if len(v) < 3 || v[0] != layout2 {
		return nil, fmt.Errorf("%w: the redis value is not a record (layout byte %q)", ErrCorruptRecord, firstByte(v))
	}
	if v[1] != stateInProgress && v[1] != stateCompleted {
		return nil, fmt.Errorf("%w: the redis value has state %q", ErrCorruptRecord, v[1])
	}
	n := 3 + int(v[2])
	if len(v) <= n {
		return nil, fmt.Errorf("%w: the redis value ends after its %d-byte header", ErrCorruptRecord, len(v))
	}
	return []byte(v[n:]), nil
}

func firstByte(v string) string {
	if v == "" {
		return ""
	}
	return v[:1]
}
