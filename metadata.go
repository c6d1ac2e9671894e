package idempotency

import (
	"context"
	"fmt"

	"google.golang.org/grpc/metadata"
)

const (
	// DefaultKeyHeader is the request metadata key that carries the
	// idempotency key, unless changed with [WithKeyHeader] or
	// [WithClientKeyHeader].
	DefaultKeyHeader = "idempotency-key"

	// ReplayedHeader is the response header the server interceptor adds, with
	// the value "true", to every answer it replays from the store instead of
	// running the handler. A first execution never carries it.
	ReplayedHeader = "idempotency-replayed"

	// MaxKeyLength is the longest valid idempotency key, in bytes.
	MaxKeyLength = 255
)

// ValidateKey reports whether key is a valid idempotency key: 1 to
// [MaxKeyLength] bytes of visible ASCII (0x21 to 0x7E). Spaces, control
// characters and non-ASCII bytes are refused. The error says what is wrong
// without echoing the key.
func ValidateKey(key string) error {
	if len(key) == 0 {
		return fmt.Errorf("%w: the key is empty", ErrInvalidKey)
	}
	if len(key) > MaxKeyLength {
		return fmt.Errorf("%w: the key is %d bytes long, the limit is %d", ErrInvalidKey, len(key), MaxKeyLength)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x21 || c > 0x7e {
			return fmt.Errorf("%w: byte %d is 0x%02x, only visible ASCII (0x21-0x7E) is allowed", ErrInvalidKey, i, c)
		}
	}
	return nil
}

// keyFromMetadata returns the key carried in header of md. present is false
// when the header is absent. More than one value, or a value that fails
// [ValidateKey], is an error wrapping [ErrInvalidKey].
func keyFromMetadata(md metadata.MD, header string) (key string, present bool, err error) {
	return keyFromValues(md.Get(header), len(md.Get(header+"-bin")) > 0, header)
}

// keyFromValues is keyFromMetadata on the values of the header, and whether
// its binary variant (header + "-bin") was sent.
func keyFromValues(vals []string, binary bool, header string) (key string, present bool, err error) {
	switch len(vals) {
	case 0:
		if binary {
			return "", true, fmt.Errorf("%w: the key must be sent as %q, not as binary metadata %q", ErrInvalidKey, header, header+"-bin")
		}
		return "", false, nil
	case 1:
	default:
		return "", true, fmt.Errorf("%w: %d values for %q, want exactly one", ErrInvalidKey, len(vals), header)
	}
	if err := ValidateKey(vals[0]); err != nil {
		return "", true, err
	}
	return vals[0], true, nil
}

// handlerKeyCtx is the context of a handler the protocol runs with a key: the
// key, and for the key's owner its fence, in one context value (one
// allocation, where a context.WithValue per value costs two each).
type handlerKeyCtx struct {
	context.Context
	key   string
	fence uint64 // 0: none
}

type keyCtxKey struct{}

// Value returns k itself for keyCtxKey, and the parent's values otherwise.
func (k *handlerKeyCtx) Value(key any) any {
	if key == (keyCtxKey{}) {
		return k
	}
	return k.Context.Value(key)
}

// KeyFromContext returns the idempotency key of the call being handled, as
// the client sent it, and whether there is one. It is set by
// [UnaryServerInterceptor] on the context passed to the handler, so a handler
// can pass the key on to a downstream provider (for example as a payment
// provider's own idempotency key).
func KeyFromContext(ctx context.Context) (string, bool) {
	if k, ok := ctx.Value(keyCtxKey{}).(*handlerKeyCtx); ok {
		return k.key, true
	}
	return "", false
}

// contextWithServerKey returns the context of a handler that runs with key
// but not as its owner (WithFailOpen): no fence.
func contextWithServerKey(ctx context.Context, key string) context.Context {
	return &handlerKeyCtx{Context: ctx, key: key}
}

// FenceFromContext returns the fencing token of the call being handled, and
// whether there is one: a number that the store gives each new owner of a
// key, strictly greater than the one of every earlier owner of the same key,
// including an owner whose lease ran out (a long GC pause, a stalled VM)
// while a retry took the key over. It is set on the context of the handler
// ([UnaryServerInterceptor], [Protocol.Handle]) and of [Do]'s function, for
// the owner only, when the store gives fences (every store of this module
// and the postgres module does).
//
// A lease cannot stop a paused owner from writing after it ended; the fence
// lets the handler's own write refuse it. Keep the highest fence written on
// the row and write only with a greater one:
//
//	UPDATE accounts SET balance = balance - $2, fence = $3
//	 WHERE id = $1 AND fence < $3
//
// Zero rows updated means a newer owner of the key has written: the handler
// returns an error and writes nothing. The fence orders the owners of one
// key; rows written under several keys need a fence column per key, or the
// write keyed on (key, fence). See the README's "Fencing a handler's
// writes" for the guarantee of each store.
func FenceFromContext(ctx context.Context) (uint64, bool) {
	for {
		k, ok := ctx.Value(keyCtxKey{}).(*handlerKeyCtx)
		if !ok {
			return 0, false
		}
		if k.fence != 0 {
			return k.fence, true
		}
		ctx = k.Context // a handler run without a fence, inside an owner's
	}
}

// contextWithOwner returns the owner's context: the key, and the fence
// when the store gave one.
func contextWithOwner(ctx context.Context, key string, fence uint64) context.Context {
	return &handlerKeyCtx{Context: ctx, key: key, fence: fence}
}

// Replayed reports whether a response header, as returned by the
// grpc.Header call option, marks the response as a replay of a stored
// outcome rather than a fresh execution.
func Replayed(header metadata.MD) bool {
	for _, v := range header.Get(ReplayedHeader) {
		if v == "true" {
			return true
		}
	}
	return false
}
