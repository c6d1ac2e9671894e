package idempotencypg

import (
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// DefaultTable is the table the store uses unless [WithTable] names
// another.
const DefaultTable = "idempotency_records"

// Option configures [New], [Schema] and [CreateSchema].
type Option func(*options)

type options struct {
	table pgx.Identifier
}

func evaluate(opts []Option) *options {
	o := &options{table: pgx.Identifier{DefaultTable}}
	for _, opt := range opts {
		if opt != nil {
			opt(o)
		}
	}
	return o
}

// WithTable sets the table of the records: a name, or a schema-qualified
// "schema.name". Each part must be 1 to 63 characters of letters, digits
// and underscores, not starting with a digit; it is quoted, so case is
// kept. Panics on any other name, since a table name comes from the
// program, never from a request.
func WithTable(name string) Option {
	parts := strings.Split(name, ".")
	if len(parts) > 2 {
		panic(fmt.Sprintf("idempotencypg: WithTable(%q): want a name or schema.name", name))
	}
	for _, p := range parts {
		if !identifier(p) {
			panic(fmt.Sprintf("idempotencypg: WithTable(%q): %q is not 1 to 63 letters, digits and underscores starting with a letter or underscore", name, p))
		}
	}
	return func(o *options) { o.table = pgx.Identifier(parts) }
}

func identifier(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i, c := range s {
		switch {
		case c == '_', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
