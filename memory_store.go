package idempotency

import (
	"bytes"
	"context"
	"sync"
	"time"
)

// MemoryStore is a [Store] in process memory: goroutine-safe, with TTLs and
// leases honoured. It suits tests and single-process servers; records do not
// survive a restart and are not shared between processes, so a fleet of
// servers needs [RedisStore].
type MemoryStore struct {
	mu      sync.Mutex
	now     func() time.Time
	entries map[string]*memEntry
	writes  uint64
}

type memEntry struct {
	token   string // owner while in progress; "" once completed
	doneBy  string // the token that completed the record
	record  []byte // nil for a fence
	fenced  string // the forgotten owner's token, for a fence (see Delete)
	expires time.Time
}

// NewMemoryStore returns an empty in-memory store.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{now: time.Now, entries: make(map[string]*memEntry)}
}

// live returns the unexpired entry of key, dropping an expired one. Callers
// hold s.mu.
func (s *MemoryStore) live(key string) *memEntry {
	e, ok := s.entries[key]
	if !ok {
		return nil
	}
	if !s.now().Before(e.expires) {
		delete(s.entries, key)
		return nil
	}
	return e
}

// sweep drops expired entries among up to 64 visited ones every 16th
// write, in the spirit of Redis's active expiry: Go's map iteration starts at
// a random place, so every entry is visited over time, and the cost per write
// is bounded (4 visits on average) whatever the number of records. In a
// steady state at most about a quarter of the entries are expired ones
// waiting. Callers hold s.mu.
func (s *MemoryStore) sweep() {
	if s.writes++; s.writes%16 != 0 {
		return
	}
	now := s.now()
	n := 0
	for k, e := range s.entries {
		if !now.Before(e.expires) {
			delete(s.entries, k)
		}
		if n++; n == 64 {
			return
		}
	}
}

// Claim implements [Store.Claim].
func (s *MemoryStore) Claim(_ context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	if err := checkExpiry("memory store", "lease", lease); err != nil {
		return ClaimResult{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.live(key); e != nil {
		if e.record != nil {
			return ClaimResult{Record: e.record, TTL: e.expires.Sub(s.now())}, nil
		}
		if e.fenced == token {
			return ClaimResult{}, ErrLeaseLost
		}
	}
	s.sweep()
	s.entries[key] = &memEntry{token: token, record: bytes.Clone(record), expires: s.now().Add(lease)}
	return ClaimResult{Claimed: true}, nil
}

// Renew implements [Store.Renew].
func (s *MemoryStore) Renew(_ context.Context, key, token string, lease time.Duration) error {
	if err := checkExpiry("memory store", "lease", lease); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.live(key)
	if e == nil || e.token != token {
		return ErrLeaseLost
	}
	e.expires = s.now().Add(lease)
	return nil
}

// RenewBatch implements [BatchRenewer]: Renew of each key, under one lock.
func (s *MemoryStore) RenewBatch(ctx context.Context, keys, tokens []string, lease time.Duration) []error {
	errs := make([]error, len(keys))
	for i := range keys {
		errs[i] = s.Renew(ctx, keys[i], tokens[i], lease)
	}
	return errs
}

// Complete implements [Store.Complete].
func (s *MemoryStore) Complete(_ context.Context, key, token string, record []byte, ttl time.Duration) error {
	if err := checkExpiry("memory store", "ttl", ttl); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.live(key)
	if e != nil && e.doneBy == token {
		return nil
	}
	if e != nil && e.token != token {
		return ErrLeaseLost
	}
	s.sweep()
	s.entries[key] = &memEntry{doneBy: token, record: bytes.Clone(record), expires: s.now().Add(ttl)}
	return nil
}

// Release implements [Store.Release].
func (s *MemoryStore) Release(_ context.Context, key, token string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.live(key)
	if e == nil {
		return nil
	}
	if e.token != token {
		return ErrLeaseLost
	}
	delete(s.entries, key)
	return nil
}

// Len returns the number of unexpired records.
func (s *MemoryStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	now := s.now()
	for _, e := range s.entries {
		if e.record != nil && now.Before(e.expires) {
			n++
		}
	}
	return n
}

// Get implements [AdminStore.Get].
func (s *MemoryStore) Get(_ context.Context, key string) ([]byte, time.Duration, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.live(key)
	if e == nil || e.record == nil {
		return nil, 0, ErrNoRecord
	}
	return bytes.Clone(e.record), e.expires.Sub(s.now()), nil
}

// Delete implements [AdminStore.Delete]. Deleting an in-progress record
// leaves a fence on its owner token for the rest of its lease.
func (s *MemoryStore) Delete(_ context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.live(key)
	if e == nil || e.record == nil {
		return ErrNoRecord
	}
	if e.token != "" {
		s.entries[key] = &memEntry{fenced: e.token, expires: e.expires}
		return nil
	}
	delete(s.entries, key)
	return nil
}
