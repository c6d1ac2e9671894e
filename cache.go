package idempotency

import (
	"container/list"
	"sync"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
)

// localCache is a bounded LRU of completed records, keyed by store key.
// Completed records are immutable until their TTL ends, which is what makes
// answering from it exact.
type localCache struct {
	mu     sync.Mutex
	max    int
	maxAge time.Duration
	ll     *list.List // front: most recently used
	items  map[string]*list.Element
}

type cacheEntry struct {
	key     string
	rec     *idempotencyv1.Record
	expires time.Time
}

func newLocalCache(max int, maxAge time.Duration) *localCache {
	return &localCache{max: max, maxAge: maxAge, ll: list.New(), items: make(map[string]*list.Element)}
}

// get returns the unexpired record of key, or nil.
func (c *localCache) get(key string, now time.Time) *idempotencyv1.Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[key]
	if !ok {
		return nil
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.ll.Remove(el)
		delete(c.items, key)
		return nil
	}
	c.ll.MoveToFront(el)
	return e.rec
}

// put caches a completed record for the earlier of ttl and maxAge from
// since. ttl is what this server knows of the record's remaining life in
// the store, measured from since on this server's clock; the record's own
// times, written by whichever server completed it, are never used.
func (c *localCache) put(key string, rec *idempotencyv1.Record, since time.Time, ttl time.Duration) {
	expires := since.Add(min(ttl, c.maxAge))
	if !since.Before(expires) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[key]; ok {
		el.Value = &cacheEntry{key: key, rec: rec, expires: expires}
		c.ll.MoveToFront(el)
		return
	}
	c.items[key] = c.ll.PushFront(&cacheEntry{key: key, rec: rec, expires: expires})
	for c.ll.Len() > c.max {
		old := c.ll.Back()
		c.ll.Remove(old)
		delete(c.items, old.Value.(*cacheEntry).key)
	}
}
