// Auto-pipelining: the script calls of concurrent calls share round trips.

package idempotency

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultPipelines is how many pipelines a [RedisStore] keeps in flight at
// most, unless changed with [WithPipelining].
const DefaultPipelines = 2

// maxPipelineCalls and maxPipelineBytes bound what one pipeline carries
// (the bytes counted are the scripts' arguments), so no round trip grows
// with the number of calls waiting, and a burst of large outcomes does not
// make one write that outlasts the client's WriteTimeout: the calls beyond
// go in the next pipeline. A single call larger than maxPipelineBytes goes
// alone.
const (
	maxPipelineCalls = 128
	maxPipelineBytes = 1 << 20
)

// autoPipeline sends the script calls of a RedisStore (claims, outcome
// writes, releases) in go-redis pipelines shared by the calls in flight: a
// call queues its script and waits for its reply, or for its own context
// to end, whichever comes first. A pipeline starts at once when fewer than
// max are in flight, so no call waits for a slot while one is free (and a
// call alone may be sent from its own goroutine: see run); under load, the
// calls that queue while the pipelines are out go together in the next
// one. Each pipeline is one write and one read per connection, for the
// store and for Redis, instead of one per call.
//
// The waiting call runs none of go-redis itself, so it is bounded by its
// own context whatever the client's ContextTimeoutEnabled, at no cost of a
// goroutine per call; the pipelines are bounded by the client's own
// timeouts. A call whose context ends while its script is still queued is
// taken out of the queue, so it is never sent; one that ends after it was
// sent may still be applied, which every caller already allows for, as for
// any network error.
//
// With acknowledgements ([WithReplicaAcks], [WithFsyncAcks]) each pipeline
// ends with the acknowledgement commands: a WAIT counts the replicas that
// acknowledged every write its connection made before it, so one WAIT
// answers for every script of the pipeline, and each call's reply comes
// with it.
type autoPipeline struct {
	client pipeliner
	max    int
	acks   acks // none: no acknowledgement commands
	// alone sends a call on its caller's goroutine, when nothing else is
	// in flight (see run); nil: every call is queued (tests).
	alone sendAlone

	mu      sync.Mutex
	queue   []*pipedCall
	senders int  // sending goroutines, at most max
	idle    int  // of them, those waiting for calls to queue
	solo    bool // a call is being sent alone
	// lastBatch is the number of calls in the last pipeline a sender sent.
	lastBatch int
	// bounded: the client honours its calls' contexts itself, so a call
	// sent alone needs no goroutine to bound it.
	bounded bool
	// queuedSent counts the calls the senders took from the queue (tests).
	queuedSent int
	// wake wakes an idle sender: a token is sent, under mu, for each
	// decrement of idle by a caller.
	wake chan struct{}
}

// senderLinger is how long a sender with nothing to send waits for calls
// before it ends: under load the same goroutines keep sending, their
// stacks already grown to go-redis's depth.
const senderLinger = 100 * time.Millisecond

// pipedCall is one queued script call. Calls are pooled: a caller puts
// its call back once it has the reply, or once it took it out of the
// queue unsent; a call abandoned after it was sent is left to the GC,
// since its sender still writes to it.
type pipedCall struct {
	script *redis.Script
	key    string
	args   []any
	size   int // of the arguments, in bytes
	cmd    *redis.Cmd
	wait   *redis.Cmd // the last acknowledgement command behind cmd; nil without acks
	queued bool       // guarded by autoPipeline.mu
	// done receives one value when cmd is set: the sender's only write
	// to the call after it took it from the queue.
	done chan struct{}
}

var pipedCalls = sync.Pool{New: func() any { return &pipedCall{done: make(chan struct{}, 1)} }}

// free puts c back in the pool.
func (c *pipedCall) free() {
	*c = pipedCall{done: c.done}
	pipedCalls.Put(c)
}

func newAutoPipeline(client pipeliner, max int, a acks, alone sendAlone, bounded bool) *autoPipeline {
	return &autoPipeline{client: client, max: max, acks: a, alone: alone, bounded: bounded, wake: make(chan struct{}, max)}
}

// sendAlone sends one script call (and its acknowledgement commands) on
// the caller's goroutine, bounded by ctx, and returns its replies as
// autoPipeline.run does.
type sendAlone func(ctx context.Context, script *redis.Script, key string, args []any) (cmd, wait *redis.Cmd)

// run queues script with key and args and returns its reply, or the
// error of ctx when ctx ends first. With acknowledgements, wait is the
// reply of the last acknowledgement command of its pipeline (nil when cmd
// failed).
func (p *autoPipeline) run(ctx context.Context, script *redis.Script, key string, args []any) (cmd, wait *redis.Cmd) {
	if err := ctx.Err(); err != nil {
		return errCmd(ctx, err), nil
	}
	c := pipedCalls.Get().(*pipedCall)
	c.script, c.key, c.args, c.size, c.queued = script, key, args, len(key), true
	for _, a := range args {
		switch a := a.(type) {
		case string:
			c.size += len(a)
		case []byte:
			c.size += len(a)
		}
	}
	p.mu.Lock()
	if p.alone != nil && !p.solo && p.lastBatch <= 1 && len(p.queue) == 0 && p.senders == p.idle && (p.bounded || ctx.Done() == nil) {
		// Nothing queued, nothing in flight, and the last pipelines
		// carried one call each (no concurrency to share them): send this
		// call from the caller's goroutine, without the two goroutine
		// handoffs a sender costs (measured: a lone first call took 1.5
		// round trips longer handed off). Only where that is cheap: a
		// client that honours ctx itself, or a ctx that never ends (else
		// bounding it would take a goroutine, a handoff too). The calls
		// that come meanwhile queue for a sender, as usual; once they
		// share pipelines, calls stop going alone until the load drops.
		p.solo = true
		p.mu.Unlock()
		c.free()
		return p.sendSolo(ctx, script, key, args)
	}
	p.queue = append(p.queue, c)
	start := false
	switch {
	case p.idle > 0:
		p.idle--
		p.wake <- struct{}{}
	case p.senders < p.max:
		p.senders++
		start = true
	}
	p.mu.Unlock()
	if start {
		go p.send()
	}
	select {
	case <-c.done:
		cmd, wait = c.cmd, c.wait
		c.free()
		return cmd, wait
	case <-ctx.Done():
	}
	p.mu.Lock()
	unsent := c.queued
	if unsent {
		// Never sent: take it out, so a queue behind a hung server does
		// not grow with abandoned calls.
		c.queued = false
		if i := slices.Index(p.queue, c); i >= 0 {
			p.queue = slices.Delete(p.queue, i, i+1)
		}
	}
	p.mu.Unlock()
	if unsent {
		c.free()
	}
	return errCmd(ctx, ctx.Err()), nil
}

// sendSolo sends one call alone (see run) and ends the solo turn.
func (p *autoPipeline) sendSolo(ctx context.Context, script *redis.Script, key string, args []any) (cmd, wait *redis.Cmd) {
	defer func() {
		p.mu.Lock()
		p.solo = false
		p.mu.Unlock()
	}()
	return p.alone(ctx, script, key, args)
}

// send sends pipelines of the queued calls until the queue has stayed
// empty for senderLinger.
func (p *autoPipeline) send() {
	var linger *time.Timer
	for {
		p.mu.Lock()
		if len(p.queue) == 0 {
			p.idle++
			p.mu.Unlock()
			if linger == nil {
				linger = time.NewTimer(senderLinger)
			} else {
				linger.Reset(senderLinger)
			}
			select {
			case <-p.wake:
				linger.Stop()
				continue
			case <-linger.C:
			}
			p.mu.Lock()
			if p.idle == 0 {
				// A caller counted on this sender (or another idle one)
				// and its token is in wake: take it and go on.
				p.mu.Unlock()
				<-p.wake
				continue
			}
			p.idle--
			p.senders--
			p.mu.Unlock()
			return
		}
		n, size := 1, p.queue[0].size
		for n < len(p.queue) && n < maxPipelineCalls && size+p.queue[n].size <= maxPipelineBytes {
			size += p.queue[n].size
			n++
		}
		var batch []*pipedCall
		if n == len(p.queue) {
			batch, p.queue = p.queue, nil
		} else {
			batch = slices.Clone(p.queue[:n])
			p.queue = slices.Delete(p.queue, 0, n)
		}
		for _, c := range batch {
			c.queued = false
		}
		p.queuedSent += len(batch)
		p.lastBatch = len(batch)
		p.mu.Unlock()
		p.exec(batch)
	}
}

// exec sends batch as one pipeline (EVALSHA each, then EVAL for the
// scripts Redis did not have cached, each followed by the acknowledgement
// commands) and hands each call its reply. The
// pipeline has no deadline of its own: the client's ReadTimeout and
// WriteTimeout bound it, and each caller stops waiting at its own
// context's end.
func (p *autoPipeline) exec(batch []*pipedCall) {
	defer func() {
		if v := recover(); v != nil {
			// A panic in the client must neither leave the callers waiting
			// forever nor crash the process from a goroutine no call owns:
			// each call gets it as an error (maybe applied, as any).
			for _, c := range batch {
				c.cmd = errCmd(context.Background(), fmt.Errorf("idempotency: redis pipeline panicked: %v", v))
				c.done <- struct{}{}
			}
		}
	}()
	ctx := context.Background()
	pipe := p.client.Pipeline()
	for _, c := range batch {
		c.cmd = c.script.EvalSha(ctx, pipe, []string{c.key}, c.args...)
	}
	wait := p.ackCommands(ctx, pipe)
	_, _ = pipe.Exec(ctx)
	var again redis.Pipeliner
	for _, c := range batch {
		c.wait = wait
		if redis.HasErrorPrefix(c.cmd.Err(), "NOSCRIPT") {
			if again == nil {
				again = p.client.Pipeline()
			}
			// EVAL loads the script into Redis's cache too.
			c.cmd = c.script.Eval(ctx, again, []string{c.key}, c.args...)
			c.wait = nil
		}
	}
	if again != nil {
		wait := p.ackCommands(ctx, again)
		_, _ = again.Exec(ctx)
		for _, c := range batch {
			if c.wait == nil {
				c.wait = wait
			}
		}
	}
	for _, c := range batch {
		c.done <- struct{}{}
	}
}

// ackCommands queues the acknowledgement commands on pipe and returns the
// last one, whose reply decides; nil without acknowledgements.
func (p *autoPipeline) ackCommands(ctx context.Context, pipe redis.Pipeliner) *redis.Cmd {
	if p.acks.none() {
		return nil
	}
	var w *redis.Cmd
	for _, args := range p.acks.commands() {
		w = pipe.Do(ctx, args...)
	}
	return w
}

// errCmd returns a reply that failed with err.
func errCmd(ctx context.Context, err error) *redis.Cmd {
	cmd := redis.NewCmd(ctx)
	cmd.SetErr(err)
	return cmd
}
