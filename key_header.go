package idempotency

import (
	"fmt"
	"strings"
)

// ParseKeyHeader reads the idempotency key from the values of an HTTP
// Idempotency-Key header, for transports that carry the key over HTTP (the
// connect and gateway modules). The draft (draft-ietf-httpapi-idempotency-key-header)
// makes the header an RFC 8941 Item whose value is a String, so the value
// `"abc"` carries the key abc; a bare value (many clients send the key
// unquoted) is taken as it is. present is false when there is no header.
//
// It refuses, with an error wrapping [ErrInvalidKey], what it cannot carry
// faithfully to the gRPC metadata: a quoted
// value that is not a valid sf-string (unterminated, an escape other than
// \" or \\, a byte outside 0x20-0x7E, anything after the closing quote,
// parameters included), a bare value with a byte outside 0x20-0x7E (the
// gateway would silently drop it, and the call would go on without a key),
// and several header lines that disagree. Identical repeated lines count as
// one. The error never echoes the value. The key itself is not judged:
// pass it to [ValidateKey].
func ParseKeyHeader(values []string) (key string, present bool, err error) {
	if len(values) == 0 {
		return "", false, nil
	}
	for i, v := range values {
		k, err := parseKeyValue(v)
		if err != nil {
			return "", true, err
		}
		if i > 0 && k != key {
			return "", true, fmt.Errorf("%w: %d header lines with different keys, want one", errMalformedHeader, len(values))
		}
		key = k
	}
	return key, true, nil
}

// parseKeyValue parses one header line: an sf-string, or a bare value.
func parseKeyValue(v string) (string, error) {
	v = strings.Trim(v, " \t") // RFC 8941 4.2: leading and trailing spaces are not part of the value
	if !strings.HasPrefix(v, `"`) {
		if i := notPrintable(v); i >= 0 {
			return "", fmt.Errorf("%w: byte %d is 0x%02x, only printable ASCII (0x20-0x7E) can be forwarded", errMalformedHeader, i, v[i])
		}
		return v, nil
	}
	return parseSFString(v)
}

// parseSFString parses an RFC 8941 sf-string (section 4.2.5) that must make
// up the whole of v.
func parseSFString(v string) (string, error) {
	var b strings.Builder
	for i := 1; i < len(v); i++ {
		switch c := v[i]; {
		case c == '\\':
			i++
			if i == len(v) {
				return "", fmt.Errorf("%w: the string ends in an escape", errMalformedHeader)
			}
			if v[i] != '"' && v[i] != '\\' {
				return "", fmt.Errorf("%w: byte %d: only \\\" and \\\\ may be escaped", errMalformedHeader, i)
			}
			b.WriteByte(v[i])
		case c == '"':
			if i != len(v)-1 {
				return "", fmt.Errorf("%w: byte %d: characters after the closing quote (parameters are not supported)", errMalformedHeader, i+1)
			}
			return b.String(), nil
		case c < 0x20 || c > 0x7e:
			return "", fmt.Errorf("%w: byte %d is 0x%02x, a string holds printable ASCII (0x20-0x7E) only", errMalformedHeader, i, c)
		default:
			b.WriteByte(c)
		}
	}
	return "", fmt.Errorf("%w: the string has no closing quote", errMalformedHeader)
}

// notPrintable returns the index of the first byte of s outside 0x20-0x7E,
// or -1.
func notPrintable(s string) int {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e {
			return i
		}
	}
	return -1
}

// errMalformedHeader is what every refusal of ParseKeyHeader wraps.
var errMalformedHeader = fmt.Errorf("%w: malformed Idempotency-Key header", ErrInvalidKey)
