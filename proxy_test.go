package idempotency

// An in-process TCP proxy between the servers and Redis that injects
// network faults: added latency, connections reset around a chosen command
// (before it reaches Redis, or after Redis ran it but before its reply gets
// back), a full partition, and a dead host (a blackhole).

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// proxyAction is what the proxy does with a client-to-Redis chunk that
// matches an armed fault.
type proxyAction int

const (
	// resetBefore resets the connection without forwarding the command:
	// Redis never sees it.
	resetBefore proxyAction = iota + 1
	// resetAfter forwards the command, waits for Redis's reply, drops it and
	// resets the connection: Redis ran the command, the client never learns.
	resetAfter
)

type proxyFault struct {
	match  []byte
	action proxyAction
	every  int // inject on every every-th match
	seen   int
	left   int // faults still to inject
}

type faultProxy struct {
	t      testing.TB
	ln     net.Listener
	target string

	latency   atomic.Int64 // added before forwarding each chunk, each way
	swallowed atomic.Int64 // chunks a blackhole swallowed

	mu          sync.Mutex
	cond        *sync.Cond
	partitioned bool
	blackhole   bool
	conns       map[*proxyConn]struct{}
	faults      []*proxyFault
	injected    map[proxyAction]int
	closed      bool
}

type proxyConn struct {
	p         *faultProxy
	client    net.Conn
	upstream  net.Conn
	dropReply atomic.Bool
	dead      atomic.Bool // blackholed: swallows everything, both ways, for good
	closeOnce sync.Once
}

// newFaultProxy listens on a loopback port and forwards to target.
func newFaultProxy(t testing.TB, target string) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy listen: %v", err)
	}
	p := &faultProxy{t: t, ln: ln, target: target, conns: map[*proxyConn]struct{}{}, injected: map[proxyAction]int{}}
	p.cond = sync.NewCond(&p.mu)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

func (p *faultProxy) Addr() string { return p.ln.Addr().String() }

// Close stops the proxy and closes every connection.
func (p *faultProxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.partitioned = false
	conns := p.conns
	p.conns = map[*proxyConn]struct{}{}
	p.cond.Broadcast()
	p.mu.Unlock()
	p.ln.Close()
	for c := range conns {
		c.reset()
	}
}

// SetLatency adds d before every chunk is forwarded, in both directions.
func (p *faultProxy) SetLatency(d time.Duration) { p.latency.Store(int64(d)) }

// Partition holds all traffic, on existing and new connections, until Heal.
// Held bytes are delivered on Heal, as TCP would deliver them once a
// partition ends, unless the connection was closed meanwhile.
func (p *faultProxy) Partition() {
	p.mu.Lock()
	p.partitioned = true
	p.mu.Unlock()
}

// Heal ends a partition.
func (p *faultProxy) Heal() {
	p.mu.Lock()
	p.partitioned = false
	p.cond.Broadcast()
	p.mu.Unlock()
}

// Blackhole makes Redis behave like a dead host, or one behind a partition
// that drops packets: every connection open now or opened before
// EndBlackhole swallows all bytes both ways, with no reply and no reset,
// until the client closes it. Connections opened after EndBlackhole work.
func (p *faultProxy) Blackhole() {
	p.mu.Lock()
	p.blackhole = true
	for c := range p.conns {
		c.dead.Store(true)
	}
	p.mu.Unlock()
}

// Swallowed returns how many chunks, either way, a blackhole swallowed.
func (p *faultProxy) Swallowed() int64 { return p.swallowed.Load() }

// EndBlackhole lets new connections through again; the swallowed ones stay
// silent, as a TCP connection to a host that lost it does.
func (p *faultProxy) EndBlackhole() {
	p.mu.Lock()
	p.blackhole = false
	p.mu.Unlock()
}

// Arm injects action on the next n client-to-Redis chunks containing match.
func (p *faultProxy) Arm(match []byte, action proxyAction, n int) { p.ArmEvery(match, action, 1, n) }

// ArmEvery injects action on every every-th chunk containing match, n times.
func (p *faultProxy) ArmEvery(match []byte, action proxyAction, every, n int) {
	p.mu.Lock()
	p.faults = append(p.faults, &proxyFault{match: match, action: action, every: every, left: n})
	p.mu.Unlock()
}

// Injected returns how many faults of the action were injected.
func (p *faultProxy) Injected(a proxyAction) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.injected[a]
}

// ResetAll resets every open connection.
func (p *faultProxy) ResetAll() {
	p.mu.Lock()
	conns := make([]*proxyConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.reset()
	}
}

func (p *faultProxy) accept() {
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		upstream, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		c := &proxyConn{p: p, client: client, upstream: upstream}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			client.Close()
			upstream.Close()
			return
		}
		p.conns[c] = struct{}{}
		c.dead.Store(p.blackhole)
		p.mu.Unlock()
		go c.pump(client, upstream, true)
		go c.pump(upstream, client, false)
	}
}

// waitOpen blocks while the network is partitioned.
func (p *faultProxy) waitOpen() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.partitioned && !p.closed {
		p.cond.Wait()
	}
	return !p.closed
}

// fault returns the action armed for chunk, consuming one injection.
func (p *faultProxy) fault(chunk []byte) proxyAction {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.faults {
		if f.left > 0 && bytes.Contains(chunk, f.match) {
			f.seen++
			if f.seen%f.every != 0 {
				continue
			}
			f.left--
			p.injected[f.action]++
			return f.action
		}
	}
	return 0
}

// reset closes both sides with RST (linger 0).
func (c *proxyConn) reset() {
	c.closeOnce.Do(func() {
		for _, conn := range []net.Conn{c.client, c.upstream} {
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			conn.Close()
		}
		c.p.mu.Lock()
		delete(c.p.conns, c)
		c.p.mu.Unlock()
	})
}

func (c *proxyConn) pump(from, to net.Conn, toRedis bool) {
	defer c.reset()
	buf := make([]byte, 64<<10)
	for {
		n, err := from.Read(buf)
		if n > 0 && c.dead.Load() {
			c.p.swallowed.Add(1)
		} else if n > 0 {
			chunk := buf[:n]
			if !c.p.waitOpen() {
				return
			}
			if d := time.Duration(c.p.latency.Load()); d > 0 {
				time.Sleep(d)
			}
			if toRedis {
				switch c.p.fault(chunk) {
				case resetBefore:
					return
				case resetAfter:
					c.dropReply.Store(true)
				}
			} else if c.dropReply.Load() {
				return // Redis answered; the client never gets the reply
			}
			if _, werr := to.Write(chunk); werr != nil {
				return
			}
		}
		if err != nil {
			return // EOF or reset: reset the other side too
		}
	}
}
