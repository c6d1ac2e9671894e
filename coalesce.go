package idempotency

import (
	"bytes"
	"sync"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
)

// flights tracks the calls in progress on this server, per store key, so
// concurrent duplicates can wait for the first one's outcome.
type flights struct {
	mu sync.Mutex
	m  map[string]*flight
}

// testHookJoined, when set by a test, is called each time a duplicate joins
// a flight.
var testHookJoined func()

type flight struct {
	fp    []byte
	done  chan struct{}
	final *idempotencyv1.Record // set before done is closed; nil if none stored
}

// join returns the flight of key and whether the caller leads it. A caller
// whose fingerprint differs from the leader's does not join: it is given a
// closed flight with no outcome, and goes to the store, which refuses it.
func (f *flights) join(key string, fp []byte) (*flight, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fl, ok := f.m[key]; ok {
		if bytes.Equal(fl.fp, fp) {
			if testHookJoined != nil {
				testHookJoined()
			}
			return fl, false
		}
		closed := &flight{done: make(chan struct{})}
		close(closed.done)
		return closed, false
	}
	fl := &flight{fp: fp, done: make(chan struct{})}
	f.m[key] = fl
	return fl, true
}

// finish publishes the leader's outcome and releases the waiters.
func (f *flights) finish(key string, fl *flight, final *idempotencyv1.Record) {
	f.mu.Lock()
	delete(f.m, key)
	f.mu.Unlock()
	fl.final = final
	close(fl.done)
}
