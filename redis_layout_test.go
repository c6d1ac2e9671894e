package idempotency

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Records stored in layout 1 (a hash per record) by versions before layout
// 2 keep working: replayed, renewed, completed, released, fenced, read and
// deleted, on miniredis and on a real redis-server. Every write the store
// makes is in layout 2.
func TestRedisLayout1RecordsStillWork(t *testing.T) {
	for _, bf := range backendFactories[1:] {
		t.Run(bf.name, func(t *testing.T) {
			b := bf.new(t)
			s, c, ctx := b.store, b.client, context.Background()
			hash := func(k string, fields ...any) {
				t.Helper()
				if err := c.HSet(ctx, b.prefix+k, fields...).Err(); err != nil {
					t.Fatal(err)
				}
				if err := c.PExpire(ctx, b.prefix+k, time.Minute).Err(); err != nil {
					t.Fatal(err)
				}
			}
			typeOf := func(k string) string { return c.Type(ctx, b.prefix+k).Val() }

			// A completed record: replayed with its TTL, completed again by
			// its own token (a retried Complete), read, deleted.
			hash("done", "rec", "final-1", "done", "tok-1")
			res, err := s.Claim(ctx, "done", "tok-2", []byte("ip"), time.Minute)
			if err != nil || res.Claimed || string(res.Record) != "final-1" || res.TTL <= 0 || res.TTL > time.Minute {
				t.Fatalf("Claim of a layout-1 completed record = %+v, %v", res, err)
			}
			if err := s.Complete(ctx, "done", "tok-1", []byte("final-1"), time.Hour); err != nil {
				t.Fatalf("retried Complete by the completing token: %v", err)
			}
			if err := s.Complete(ctx, "done", "tok-2", []byte("forged"), time.Hour); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Complete by another token = %v, want ErrLeaseLost", err)
			}
			admin := s.(AdminStore)
			if rec, ttl, err := admin.Get(ctx, "done"); err != nil || string(rec) != "final-1" || ttl <= 0 {
				t.Fatalf("Get = %q, %v, %v", rec, ttl, err)
			}
			if err := admin.Delete(ctx, "done"); err != nil || typeOf("done") != "none" {
				t.Fatalf("Delete = %v, key now %s", err, typeOf("done"))
			}

			// A claim in progress: seen in progress by others, renewed and
			// completed by its owner, the outcome written in layout 2.
			hash("ip", "tok", "tok-1", "rec", "in-progress-1")
			if res, err := s.Claim(ctx, "ip", "tok-2", []byte("x"), time.Minute); err != nil || res.Claimed || string(res.Record) != "in-progress-1" {
				t.Fatalf("Claim of a layout-1 claim = %+v, %v", res, err)
			}
			if err := s.Renew(ctx, "ip", "tok-2", time.Minute); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Renew by another token = %v", err)
			}
			if err := s.Renew(ctx, "ip", "tok-1", 2*time.Minute); err != nil {
				t.Fatalf("Renew by the owner: %v", err)
			}
			if ttl := c.PTTL(ctx, b.prefix+"ip").Val(); ttl <= time.Minute {
				t.Fatalf("TTL after Renew = %v, want the new lease", ttl)
			}
			if err := s.Complete(ctx, "ip", "tok-1", []byte("final-ip"), time.Hour); err != nil {
				t.Fatalf("Complete by the owner: %v", err)
			}
			if typeOf("ip") != "string" {
				t.Fatalf("completed record is a %s, want a layout-2 string", typeOf("ip"))
			}
			if res, err := s.Claim(ctx, "ip", "tok-3", []byte("x"), time.Minute); err != nil || string(res.Record) != "final-ip" {
				t.Fatalf("replay after Complete = %+v, %v", res, err)
			}
			if err := s.Complete(ctx, "ip", "tok-1", []byte("final-ip"), time.Hour); err != nil {
				t.Fatalf("retried Complete after the switch to layout 2: %v", err)
			}

			// A claim in progress released by its owner.
			hash("rel", "tok", "tok-1", "rec", "in-progress")
			if err := s.Release(ctx, "rel", "tok-2"); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Release by another token = %v", err)
			}
			if err := s.Release(ctx, "rel", "tok-1"); err != nil || typeOf("rel") != "none" {
				t.Fatalf("Release by the owner = %v, key now %s", err, typeOf("rel"))
			}

			// A fence left by a forget: its token stays fenced off, another
			// claims at once.
			hash("fence", "fenced", "tok-1")
			if _, err := s.Claim(ctx, "fence", "tok-1", []byte("x"), time.Minute); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Claim by the fenced token = %v, want ErrLeaseLost", err)
			}
			if res, err := s.Claim(ctx, "fence", "tok-2", []byte("x"), time.Minute); err != nil || !res.Claimed || typeOf("fence") != "string" {
				t.Fatalf("Claim over another token's fence = %+v, %v (key a %s)", res, err, typeOf("fence"))
			}

			// Forgetting a layout-1 claim in progress fences its owner off.
			hash("forget", "tok", "tok-1", "rec", "in-progress")
			if err := admin.Delete(ctx, "forget"); err != nil {
				t.Fatal(err)
			}
			if err := s.Complete(ctx, "forget", "tok-1", []byte("late"), time.Hour); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Complete by the forgotten owner = %v, want ErrLeaseLost", err)
			}
			if err := s.Renew(ctx, "forget", "tok-1", time.Minute); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Renew by the forgotten owner = %v, want ErrLeaseLost", err)
			}
		})
	}
}

// Every value the store writes is a layout-3 string that layoutRecord
// reads back, the claim's fence in it, and a token longer than the layout
// holds is refused before anything is written. A layout-2 value (no fence)
// still reads.
func TestRedisLayout3(t *testing.T) {
	b := newMiniredisBackend(t)
	ctx := context.Background()
	rec := bytes.Repeat([]byte{0x08, 0x01}, 100)
	res, err := b.store.Claim(ctx, "k", "tok", rec, time.Minute)
	if err != nil || !res.Claimed || res.Fence == 0 {
		t.Fatalf("Claim = %+v, %v", res, err)
	}
	v, err := b.client.Get(ctx, b.prefix+"k").Result()
	if err != nil {
		t.Fatal(err)
	}
	if want := "\x03I\x03tok"; v[:len(want)] != want {
		t.Fatalf("in-progress value starts %q, want %q", v[:len(want)], want)
	}
	if got, fence, err := layoutRecord(v); err != nil || !bytes.Equal(got, rec) || fence != res.Fence {
		t.Fatalf("layoutRecord = %x, fence %d, %v; want fence %d", got, fence, err, res.Fence)
	}
	if again, err := b.store.Claim(ctx, "k", "tok", rec, time.Minute); err != nil || again.Claimed || again.Fence != res.Fence {
		t.Fatalf("the owner's repeated Claim = %+v, %v; want its fence %d", again, err, res.Fence)
	}
	if err := b.store.Complete(ctx, "k", "tok", []byte("final"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if v := b.client.Get(ctx, b.prefix+"k").Val(); v != "\x03D\x03tok\x00\x00\x00\x00\x00\x00\x00\x00final" {
		t.Fatalf("completed value = %q", v)
	}
	if got, fence, err := layoutRecord("\x02I\x03tokrecord"); err != nil || string(got) != "record" || fence != 0 {
		t.Fatalf("layoutRecord of a layout-2 value = %q, %d, %v", got, fence, err)
	}
	long := string(bytes.Repeat([]byte("t"), maxTokenLen+1))
	if _, err := b.store.Claim(ctx, "long", long, rec, time.Minute); err == nil {
		t.Fatal("Claim with a 256-byte token: no error")
	}
	if err := b.client.Get(ctx, b.prefix+"long").Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("a refused claim wrote the key: %v", err)
	}
}

// A forget's fence keeps the forgotten owner's fence, so the next owner's
// is greater even when the server's clock reads less (set back here with
// miniredis): the fence of a deleted in-progress record never repeats.
// Layout-2 values written by issue 14's version (no fence) keep working.
func TestRedisFenceAcrossForget(t *testing.T) {
	b := newMiniredisBackend(t)
	ctx := context.Background()
	const ahead = uint64(1) << 52 // far past the clock, in microseconds
	v := []byte("\x03I\x03tok")
	v = binary.BigEndian.AppendUint64(v, ahead)
	v = append(v, "record"...)
	if err := b.client.Set(ctx, b.prefix+"k", v, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if err := b.store.(AdminStore).Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.store.Claim(ctx, "k", "tok", []byte("x"), time.Minute); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Claim by the forgotten owner = %v, want ErrLeaseLost", err)
	}
	res, err := b.store.Claim(ctx, "k", "new", []byte("x"), time.Minute)
	if err != nil || !res.Claimed || res.Fence != ahead+1 {
		t.Fatalf("Claim over the fence = %+v, %v; want fence %d", res, err, ahead+1)
	}

	// Layout 2: a claim in progress, renewed, completed, replayed.
	if err := b.client.Set(ctx, b.prefix+"old", "\x02I\x03tokin progress", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if res, err := b.store.Claim(ctx, "old", "other", []byte("x"), time.Minute); err != nil || res.Claimed || string(res.Record) != "in progress" || res.Fence != 0 {
		t.Fatalf("Claim of a layout-2 claim = %+v, %v", res, err)
	}
	if err := b.store.Renew(ctx, "old", "tok", time.Minute); err != nil {
		t.Fatalf("Renew of a layout-2 claim: %v", err)
	}
	if err := b.store.Complete(ctx, "old", "tok", []byte("final"), time.Hour); err != nil {
		t.Fatalf("Complete of a layout-2 claim: %v", err)
	}
	if res, err := b.store.Claim(ctx, "old", "other", []byte("x"), time.Minute); err != nil || string(res.Record) != "final" {
		t.Fatalf("replay = %+v, %v", res, err)
	}
}
