package idempotency

import (
	"fmt"
	"strings"
	"sync"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// methodDescriptor finds the descriptor of a full gRPC method name
// ("/pkg.Service/Method") in the global registry, or nil.
func methodDescriptor(fullMethod string) protoreflect.MethodDescriptor {
	name := strings.TrimPrefix(fullMethod, "/")
	i := strings.LastIndexByte(name, '/')
	if i < 0 {
		return nil
	}
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(name[:i] + "." + name[i+1:]))
	if err != nil {
		return nil
	}
	md, _ := d.(protoreflect.MethodDescriptor)
	return md
}

// DeclaredKeyPolicy returns the [KeyPolicy] a method declares in its
// protobuf descriptor: KeyRequired for `(idempotency.v1.method) =
// {key_required: true}`, KeyIgnored for `idempotency_level = NO_SIDE_EFFECTS`
// or `IDEMPOTENT`, and KeyOptional otherwise, including for methods whose
// descriptor is not registered. key_required wins over idempotency_level.
func DeclaredKeyPolicy(fullMethod string) KeyPolicy {
	md := methodDescriptor(fullMethod)
	if md == nil {
		return KeyOptional
	}
	opts, ok := md.Options().(*descriptorpb.MethodOptions)
	if !ok || opts == nil {
		return KeyOptional
	}
	if m, ok := proto.GetExtension(opts, idempotencyv1.E_Method).(*idempotencyv1.MethodIdempotency); ok && m.GetKeyRequired() {
		return KeyRequired
	}
	switch opts.GetIdempotencyLevel() {
	case descriptorpb.MethodOptions_NO_SIDE_EFFECTS, descriptorpb.MethodOptions_IDEMPOTENT:
		return KeyIgnored
	}
	return KeyOptional
}

// policyCache memoises the policy and response type of each method:
// descriptors and options never change while the process runs.
type policyCache struct {
	override func(string, KeyPolicy) KeyPolicy
	m        sync.Map // full method -> KeyPolicy
	mIdem    sync.Map // the same, for methods a transport declares idempotent
	types    sync.Map // full method -> protoreflect.MessageType (or nil)
}

// messageType resolves a stored response type, which must be the method's
// output type when the method is registered.
func (c *policyCache) messageType(method, stored string) (protoreflect.MessageType, error) {
	v, ok := c.types.Load(method)
	if !ok {
		v, _ = c.types.LoadOrStore(method, responseType(method))
	}
	if mt, _ := v.(protoreflect.MessageType); mt != nil {
		if string(mt.Descriptor().FullName()) != stored {
			return nil, fmt.Errorf("%w: response type %q, method returns %q", ErrCorruptRecord, stored, mt.Descriptor().FullName())
		}
		return mt, nil
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(stored))
	if err != nil {
		return nil, fmt.Errorf("%w: unknown response type %q", ErrCorruptRecord, stored)
	}
	return mt, nil
}

// get returns the policy of fullMethod. idempotent is what the transport
// declares of the method (see Call.Idempotent): it makes the declared
// policy KeyIgnored unless the method requires a key.
func (c *policyCache) get(fullMethod string, idempotent bool) KeyPolicy {
	m := &c.m
	if idempotent {
		m = &c.mIdem
	}
	if p, ok := m.Load(fullMethod); ok {
		return p.(KeyPolicy)
	}
	p := DeclaredKeyPolicy(fullMethod)
	if idempotent && p != KeyRequired {
		p = KeyIgnored
	}
	if c.override != nil {
		p = c.override(fullMethod, p)
	}
	m.Store(fullMethod, p)
	return p
}

// responseType returns the message type of a method's response, from its
// registered descriptor.
func responseType(fullMethod string) protoreflect.MessageType {
	md := methodDescriptor(fullMethod)
	if md == nil {
		return nil
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName())
	if err != nil {
		return nil
	}
	return mt
}
