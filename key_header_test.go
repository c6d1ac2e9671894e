package idempotency

import (
	"errors"
	"strings"
	"testing"
)

// TestParseKeyHeader verifies the reading of the Idempotency-Key header:
// RFC 8941 strings are unquoted, bare values pass as they are, and what
// cannot be carried faithfully is refused without echoing the value.
func TestParseKeyHeader(t *testing.T) {
	for _, tc := range []struct {
		name    string
		values  []string
		key     string
		present bool
		err     bool
	}{
		{name: "absent", values: nil},
		{name: "string", values: []string{`"order-42"`}, key: "order-42", present: true},
		{name: "bare", values: []string{`order-42`}, key: "order-42", present: true},
		{name: "uuid, not an sf-token", values: []string{"8e03978e-40d5-43e8-bc93-6894a57f9324"}, key: "8e03978e-40d5-43e8-bc93-6894a57f9324", present: true},
		{name: "escapes", values: []string{`"a\"b\\c"`}, key: `a"b\c`, present: true},
		{name: "surrounding spaces", values: []string{" \t\"k\" "}, key: "k", present: true},
		{name: "space inside: for the server to judge", values: []string{`"a b"`}, key: "a b", present: true},
		{name: "empty string: for the server to judge", values: []string{`""`}, key: "", present: true},
		{name: "empty bare: for the server to judge", values: []string{""}, key: "", present: true},
		{name: "same key twice", values: []string{`"k"`, "k"}, key: "k", present: true},
		{name: "unterminated", values: []string{`"abc`}, present: true, err: true},
		{name: "lone quote", values: []string{`"`}, present: true, err: true},
		{name: "bad escape", values: []string{`"a\qb"`}, present: true, err: true},
		{name: "escape at the end", values: []string{`"a\`}, present: true, err: true},
		{name: "parameters", values: []string{`"abc";p=1`}, present: true, err: true},
		{name: "a list", values: []string{`"a", "b"`}, present: true, err: true},
		{name: "tab in a string", values: []string{"\"a\tb\""}, present: true, err: true},
		{name: "control byte in a string", values: []string{"\"a\x01b\""}, present: true, err: true},
		{name: "DEL in a string", values: []string{"\"a\x7fb\""}, present: true, err: true},
		{name: "non-ASCII in a string", values: []string{`"ké"`}, present: true, err: true},
		{name: "non-ASCII bare", values: []string{"ké"}, present: true, err: true},
		{name: "control byte bare", values: []string{"a\x01b"}, present: true, err: true},
		{name: "different keys", values: []string{"a", "b"}, present: true, err: true},
		{name: "a malformed second line", values: []string{`"a"`, `"a`}, present: true, err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, present, err := ParseKeyHeader(tc.values)
			if (err != nil) != tc.err {
				t.Fatalf("ParseKeyHeader(%q) error = %v, want error: %v", tc.values, err, tc.err)
			}
			if err != nil {
				if !errors.Is(err, ErrInvalidKey) {
					t.Errorf("error %v does not wrap ErrInvalidKey", err)
				}
				for _, v := range tc.values {
					if v := strings.Trim(v, `" `); len(v) > 2 && strings.Contains(err.Error(), v) {
						t.Errorf("error %q echoes the value %q", err, v)
					}
				}
			}
			if key != tc.key || present != tc.present {
				t.Errorf("ParseKeyHeader(%q) = %q, %v; want %q, %v", tc.values, key, present, tc.key, tc.present)
			}
		})
	}
}
