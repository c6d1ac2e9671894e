package idempotency

import (
	"bytes"
	"context"
	"sync"
	"time"
)

// MemoryStore is a [Store] in process memory: goroutine-safe, with TTLs and
// leases honoured. Its fences ([ClaimResult.Fence]) count the store's
// claims, so they grow for every key and never repeat within the store's
// life. It suits tests and single-process servers; records do not
// survive a restart and are not shared between processes, so a fleet of
// servers needs [RedisStore].
type MemoryStore struct {
	mu      sync.Mutex
	now     func() time.Time
	entries map[string]*memEntry
	// queues, by duration, drop expired entries as new ones are written.
	queues map[time.Duration]*expiryQueue
	order  []*expiryQueue // the queues, visited in turn
	turn   int
	// fences counts the claims: the fence of each claim is the next count,
	// so it grows for every key, whatever happened to the key's entry.
	fences uint64
}

type memEntry struct {
	token   string // owner while in progress; "" once completed
	doneBy  string // the token that completed the record
	record  []byte // nil for a fence
	fenced  string // the forgotten owner's token, for a fence (see Delete)
	fence   uint64 // the owner's fencing token while in progress
	expires time.Time
}

// NewMemoryStore returns an empty in-memory store.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{now: time.Now, entries: make(map[string]*memEntry), queues: make(map[time.Duration]*expiryQueue)}
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

// expiryQueue holds, in the order they were written, the entries written
// with one duration (a lease, a TTL), hence in the order they expire: a
// list of fixed-size chunks, so pushing never copies what is queued.
type expiryQueue struct {
	head, tail *expiryChunk
	next       int // index of the front item in head
}

type expiryChunk struct {
	items [128]expiryItem
	n     int
	link  *expiryChunk
}

// expiryItem names a key and when the entry written then expires. It holds
// no pointer to the entry, so a record deleted early is not kept alive.
type expiryItem struct {
	key     string
	expires time.Time
}

func (q *expiryQueue) push(it expiryItem) {
	if q.tail == nil || q.tail.n == len(q.tail.items) {
		c := &expiryChunk{}
		if q.tail == nil {
			q.head, q.next = c, 0
		} else {
			q.tail.link = c
		}
		q.tail = c
	}
	q.tail.items[q.tail.n] = it
	q.tail.n++
}

// front returns the front item, or nil when the queue is empty.
func (q *expiryQueue) front() *expiryItem {
	if q.head == nil || q.next == q.head.n {
		return nil
	}
	return &q.head.items[q.next]
}

func (q *expiryQueue) pop() {
	q.head.items[q.next] = expiryItem{}
	if q.next++; q.next < len(q.head.items) {
		return
	}
	q.head, q.next = q.head.link, 0
	if q.head == nil {
		q.tail = nil
	}
}

// maxExpiryQueues bounds the number of distinct durations tracked; entries
// written with others expire only when read (see live).
const maxExpiryQueues = 64

// track queues key, just written with duration d to expire at expires,
// then drops up to two expired entries at the front of that duration's
// queue and of one other queue, taken in turn. Entries written with one duration expire in
// the order they were written, so the front of each queue is its next
// expiry: the cost per write is constant whatever the number of records,
// and every queue drains faster than writes fill it, including one no
// longer written to. Callers hold s.mu.
func (s *MemoryStore) track(key string, expires time.Time, d time.Duration, now time.Time) {
	q := s.queues[d]
	if q == nil && len(s.queues) < maxExpiryQueues {
		q = &expiryQueue{}
		s.queues[d] = q
		s.order = append(s.order, q)
	}
	if q != nil {
		q.push(expiryItem{key: key, expires: expires})
		s.drop(q, now)
	}
	if len(s.order) > 1 {
		s.turn = (s.turn + 1) % len(s.order)
		if other := s.order[s.turn]; other != q {
			s.drop(other, now)
		}
	}
}

// drop removes up to two expired entries at the front of q. Callers hold
// s.mu.
func (s *MemoryStore) drop(q *expiryQueue, now time.Time) {
	for i := 0; i < 2; i++ {
		it := q.front()
		if it == nil || now.Before(it.expires) {
			return
		}
		// The key may hold a newer or renewed entry since: only an
		// expired one goes.
		if cur, ok := s.entries[it.key]; ok && !now.Before(cur.expires) {
			delete(s.entries, it.key)
		}
		q.pop()
	}
}

// Claim implements [Store.Claim].
func (s *MemoryStore) Claim(_ context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, error) {
	if err := checkExpiry("memory store", "lease", lease); err != nil {
		return ClaimResult{}, err
	}
	if err := checkToken("memory store", token); err != nil {
		return ClaimResult{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.live(key); e != nil {
		if e.record != nil {
			return ClaimResult{Record: e.record, TTL: e.expires.Sub(s.now()), Fence: e.fence}, nil
		}
		if e.fenced == token {
			return ClaimResult{}, ErrLeaseLost
		}
	}
	now := s.now()
	s.fences++
	e := &memEntry{token: token, record: bytes.Clone(record), fence: s.fences, expires: now.Add(lease)}
	s.entries[key] = e
	s.track(key, e.expires, lease, now)
	return ClaimResult{Claimed: true, Fence: e.fence}, nil
}

// Renew implements [Store.Renew].
func (s *MemoryStore) Renew(_ context.Context, key, token string, lease time.Duration) error {
	if err := checkExpiry("memory store", "lease", lease); err != nil {
		return err
	}
	if err := checkToken("memory store", token); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.live(key)
	if e == nil || e.token != token {
		return ErrLeaseLost
	}
	now := s.now()
	e.expires = now.Add(lease)
	s.track(key, e.expires, lease, now)
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
	if err := checkToken("memory store", token); err != nil {
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
	now := s.now()
	e = &memEntry{doneBy: token, record: bytes.Clone(record), expires: now.Add(ttl)}
	s.entries[key] = e
	s.track(key, e.expires, ttl, now)
	return nil
}

// Release implements [Store.Release].
func (s *MemoryStore) Release(_ context.Context, key, token string) error {
	if err := checkToken("memory store", token); err != nil {
		return err
	}
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
