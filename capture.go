package idempotency

import (
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// capturingStream wraps the server transport stream of a call so the
// interceptor sees the header and trailer metadata the handler sets or sends
// (grpc.SetHeader, grpc.SendHeader, grpc.SetTrailer), to store them with the
// outcome. Every call is passed on to the real stream, without the replay
// marker (see markerGuard).
type capturingStream struct {
	grpc.ServerTransportStream

	mu      sync.Mutex
	header  metadata.MD
	trailer metadata.MD
}

// SetHeader records md and passes it on.
func (s *capturingStream) SetHeader(md metadata.MD) error {
	md = withoutMarker(md)
	if err := s.ServerTransportStream.SetHeader(md); err != nil {
		return err
	}
	s.mu.Lock()
	s.header = metadata.Join(s.header, md)
	s.mu.Unlock()
	return nil
}

// SendHeader records md and passes it on.
func (s *capturingStream) SendHeader(md metadata.MD) error {
	md = withoutMarker(md)
	if err := s.ServerTransportStream.SendHeader(md); err != nil {
		return err
	}
	s.mu.Lock()
	s.header = metadata.Join(s.header, md)
	s.mu.Unlock()
	return nil
}

// SetTrailer records md and passes it on.
func (s *capturingStream) SetTrailer(md metadata.MD) error {
	md = withoutMarker(md)
	if err := s.ServerTransportStream.SetTrailer(md); err != nil {
		return err
	}
	s.mu.Lock()
	s.trailer = metadata.Join(s.trailer, md)
	s.mu.Unlock()
	return nil
}

// captured returns the header and trailer the handler sent so far, nil
// when it sent none. They are not copied: every Set or Send joins into a
// new map (metadata.Join), so a map once returned is never written again,
// even by a handler's goroutine that sends more after the handler
// returned.
func (s *capturingStream) captured() (header, trailer metadata.MD) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.header, s.trailer
}

// markerGuard wraps the server transport stream of a call the interceptor
// does not execute as a key's owner (no key, an ignored method, fail-open),
// so that the handler cannot produce the replay marker either: the marker
// is the interceptor's alone, and a handler that forwards a downstream's
// headers must not make a first answer look like a replay.
type markerGuard struct {
	grpc.ServerTransportStream
}

// SetHeader passes md on without the replay marker.
func (g markerGuard) SetHeader(md metadata.MD) error {
	return g.ServerTransportStream.SetHeader(withoutMarker(md))
}

// SendHeader passes md on without the replay marker.
func (g markerGuard) SendHeader(md metadata.MD) error {
	return g.ServerTransportStream.SendHeader(withoutMarker(md))
}

// SetTrailer passes md on without the replay marker.
func (g markerGuard) SetTrailer(md metadata.MD) error {
	return g.ServerTransportStream.SetTrailer(withoutMarker(md))
}

// withoutMarker returns md without the replay marker ([ReplayedHeader], in
// any letter case), copying only when it holds one.
func withoutMarker(md metadata.MD) metadata.MD {
	found := false
	for k := range md {
		if strings.EqualFold(k, ReplayedHeader) {
			found = true
			break
		}
	}
	if !found {
		return md
	}
	out := make(metadata.MD, len(md))
	for k, v := range md {
		if !strings.EqualFold(k, ReplayedHeader) {
			out[k] = v
		}
	}
	return out
}
