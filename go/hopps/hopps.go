// Package hopps is the Go client of hopps, a parameter server for recommendation models.
//
// It calls libhopps (the C ABI over the Rust client, crates/capi) through cgo, so Go gets the
// same connection handling, deadlines and error codes as every other hopps client. It needs
// nothing but the standard library and libhopps:
//
//	cargo build --release -p hopps-capi
//	CGO_LDFLAGS="-L$PWD/target/release -Wl,-rpath,$PWD/target/release" go build ./...
//
// (or put libhopps.so / libhopps.a where the linker looks). Usage:
//
//	client, err := hopps.Dial("127.0.0.1:7070")
//	if err != nil { ... }
//	defer client.Close()
//	ctx, cancel := context.WithTimeout(ctx, 5*time.Millisecond)
//	defer cancel()
//	res, err := client.Lookup(ctx, "ctr", "user", []uint64{1, 2, 3})
//	// res.Row(0), res.Found[0], res.Version
//
// A Client is safe for concurrent use by many goroutines; share one per process and node.
// Context deadlines travel to libhopps as the call's deadline, and a call whose context ends
// returns ctx.Err() at once.
package hopps

/*
#cgo CFLAGS: -I${SRCDIR}/../../crates/capi/include
#cgo LDFLAGS: -lhopps -lpthread -ldl -lm
#include <stdlib.h>
#include "hopps.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
	"unsafe"
)

// Code is a gRPC status code, as libhopps and the server report it.
type Code int32

// The codes a hopps call can fail with (gRPC numbering).
const (
	OK                 Code = 0
	Canceled           Code = 1
	Unknown            Code = 2
	InvalidArgument    Code = 3
	DeadlineExceeded   Code = 4
	NotFound           Code = 5
	AlreadyExists      Code = 6
	PermissionDenied   Code = 7
	ResourceExhausted  Code = 8
	FailedPrecondition Code = 9
	Aborted            Code = 10
	OutOfRange         Code = 11
	Unimplemented      Code = 12
	Internal           Code = 13
	Unavailable        Code = 14
	DataLoss           Code = 15
	Unauthenticated    Code = 16
)

// String is the upper-case gRPC name of the code ("NOT_FOUND").
func (c Code) String() string {
	return C.GoString(C.hopps_code_name(C.int32_t(c)))
}

// Error is a failed call: the operation, the gRPC code and the message from libhopps or the
// server, which names the model, table or argument concerned and says what to do.
type Error struct {
	// Op names the call and its model and table, e.g. `lookup "ctr"/"user"`.
	Op string
	// Code is the gRPC status code.
	Code Code
	// Message is the full message of libhopps (it starts with the code's name).
	Message string
}

func (e *Error) Error() string {
	return "hopps: " + e.Op + ": " + e.Message
}

// Is makes errors.Is(err, context.DeadlineExceeded) true for a call whose deadline passed,
// whether the deadline came from a context or from the client's request timeout.
func (e *Error) Is(target error) bool {
	return target == context.DeadlineExceeded && e.Code == DeadlineExceeded
}

// CodeOf is the code of err: OK for nil, the code of an *Error, DeadlineExceeded or Canceled
// for the context errors, Unknown otherwise.
func CodeOf(err error) Code {
	var hoppsErr *Error
	switch {
	case err == nil:
		return OK
	case errors.As(err, &hoppsErr):
		return hoppsErr.Code
	case errors.Is(err, context.DeadlineExceeded):
		return DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return Canceled
	default:
		return Unknown
	}
}

// ErrClosed is returned by calls on a Client after Close.
var ErrClosed = errors.New("hopps: the client is closed; Dial a new one")

// Option changes how Dial connects.
type Option func(*C.hopps_options)

func millis(d time.Duration) C.uint32_t {
	ms := (d + time.Millisecond - 1) / time.Millisecond
	if ms < 1 {
		ms = 1
	}
	if ms > math.MaxUint32 {
		ms = math.MaxUint32
	}
	return C.uint32_t(ms)
}

// WithConnectTimeout bounds the time to establish the connection (default 5s).
func WithConnectTimeout(d time.Duration) Option {
	return func(o *C.hopps_options) { o.connect_timeout_ms = millis(d) }
}

// WithRequestTimeout is the deadline of calls whose context has none (default 60s).
func WithRequestTimeout(d time.Duration) Option {
	return func(o *C.hopps_options) { o.request_timeout_ms = millis(d) }
}

// WithMaxMessageBytes bounds the size of a message sent or received (default 256 MiB).
func WithMaxMessageBytes(n uint64) Option {
	return func(o *C.hopps_options) { o.max_message_bytes = C.uint64_t(n) }
}

// WithWorkerThreads sets the threads that drive the connection (default: one per core).
func WithWorkerThreads(n int) Option {
	return func(o *C.hopps_options) {
		if n > 0 && n <= math.MaxUint32 {
			o.worker_threads = C.uint32_t(n)
		}
	}
}

// Client is a connection to one hopps node. It is safe for concurrent use.
type Client struct {
	addr string
	// mu guards handle: calls hold it shared while libhopps runs, Close holds it exclusively,
	// so the handle is never freed under a call in flight.
	mu     sync.RWMutex
	handle *C.hopps_client
	// dims caches each table's dim to size lookup buffers.
	dimsMu sync.RWMutex
	dims   map[tableRef]uint32
}

// tableRef names a table of a model.
type tableRef struct{ model, table string }

// opName names a call for its error messages; formatted only when a call fails.
type opName struct{ verb, model, table string }

func (o opName) String() string {
	if o.table == "" {
		return fmt.Sprintf("%s %q", o.verb, o.model)
	}
	return fmt.Sprintf("%s %q/%q", o.verb, o.model, o.table)
}

// Dial connects to the hopps node at addr ("host:port" or "http://host:port").
func Dial(addr string, opts ...Option) (*Client, error) {
	var options C.hopps_options
	for _, opt := range opts {
		opt(&options)
	}
	caddr := C.CString(addr)
	defer C.free(unsafe.Pointer(caddr))
	var handle *C.hopps_client
	var cerr *C.hopps_error
	if rc := C.hopps_connect(caddr, &options, &handle, &cerr); rc != C.HOPPS_OK {
		return nil, takeError(opName{verb: "dial", model: addr}, rc, cerr)
	}
	return &Client{addr: addr, handle: handle, dims: make(map[tableRef]uint32)}, nil
}

// Addr is the address the client was dialled with.
func (c *Client) Addr() string { return c.addr }

// Close closes the connection. It waits for calls in flight (each bounded by its deadline);
// later calls return ErrClosed. Closing twice is harmless.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.handle != nil {
		C.hopps_client_free(c.handle)
		c.handle = nil
	}
	return nil
}

// takeError turns a failed libhopps call into an *Error and frees the C error.
func takeError(op opName, rc C.int32_t, cerr *C.hopps_error) error {
	err := &Error{Op: op.String(), Code: Code(rc)}
	if cerr != nil {
		err.Message = C.GoString(C.hopps_error_message(cerr))
		C.hopps_error_free(cerr)
	} else {
		err.Message = Code(rc).String()
	}
	return err
}

// cCall is one libhopps call, given the live handle and the call's deadline in ms (0: none).
type cCall func(handle *C.hopps_client, timeoutMs C.uint32_t, cerr **C.hopps_error) C.int32_t

// do runs call under ctx: the context's deadline becomes the call's, and when the context ends
// first, do returns ctx.Err() at once. The abandoned C call ends by its own deadline; its
// results go nowhere, as every buffer it writes belongs to this call alone, and every C string
// it reads is allocated and freed inside call itself, so nothing is freed under it.
func (c *Client) do(ctx context.Context, op opName, call cCall) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var timeout C.uint32_t
	if deadline, ok := ctx.Deadline(); ok {
		left := time.Until(deadline)
		if left <= 0 {
			return context.DeadlineExceeded
		}
		timeout = millis(left)
	}
	c.mu.RLock()
	if c.handle == nil {
		c.mu.RUnlock()
		return ErrClosed
	}
	handle := c.handle
	if ctx.Done() == nil {
		// context.Background and friends can never end: no watcher needed.
		defer c.mu.RUnlock()
		var cerr *C.hopps_error
		if rc := call(handle, timeout, &cerr); rc != C.HOPPS_OK {
			return takeError(op, rc, cerr)
		}
		return nil
	}
	done := make(chan error, 1)
	go func() {
		defer c.mu.RUnlock()
		var cerr *C.hopps_error
		if rc := call(handle, timeout, &cerr); rc != C.HOPPS_OK {
			done <- takeError(op, rc, cerr)
			return
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil && ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// cString is a C copy of s; the caller frees it after the C call that reads it.
func cString(s string) *C.char { return C.CString(s) }

// withNames runs call with C copies of model and table, freed once it returns.
func withNames(model, table string, call func(cmodel, ctable *C.char) C.int32_t) C.int32_t {
	cmodel, ctable := cString(model), cString(table)
	defer C.free(unsafe.Pointer(cmodel))
	defer C.free(unsafe.Pointer(ctable))
	return call(cmodel, ctable)
}

// TableDim is the dim of table in model, as the node reports it. Lookups learn it by
// themselves; it is cached per client.
func (c *Client) TableDim(ctx context.Context, model, table string) (int, error) {
	ref := tableRef{model, table}
	c.dimsMu.RLock()
	dim, ok := c.dims[ref]
	c.dimsMu.RUnlock()
	if ok {
		return int(dim), nil
	}
	var got C.uint32_t
	err := c.do(ctx, opName{"table dim", model, table},
		func(h *C.hopps_client, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t {
			return withNames(model, table, func(cmodel, ctable *C.char) C.int32_t {
				return C.hopps_table_dim(h, cmodel, ctable, &got, timeout, cerr)
			})
		})
	if err != nil {
		return 0, err
	}
	c.rememberDim(ref, uint32(got))
	return int(got), nil
}

func (c *Client) rememberDim(ref tableRef, dim uint32) {
	c.dimsMu.Lock()
	c.dims[ref] = dim
	c.dimsMu.Unlock()
}

// Result holds the rows of one table for a batch of keys, in key order.
type Result struct {
	// Values holds len(keys) * Dim floats, row after row. Rows of keys not found follow the
	// table's missing-key policy (zeros, or a deterministic per-key init).
	Values []float32
	// Dim is the number of floats per row.
	Dim int
	// Found tells, per key, whether the table holds it.
	Found []bool
	// Version is the model version the rows were read at.
	Version uint64
	// bitmap is LookupInto's reusable scratch for the found bitmap.
	bitmap []byte
}

// Row is the row of the i-th key (a sub-slice of Values).
func (r *Result) Row(i int) []float32 { return r.Values[i*r.Dim : (i+1)*r.Dim] }

// Lookup reads the rows of keys from table of model, at the version the node serves.
func (c *Client) Lookup(ctx context.Context, model, table string, keys []uint64) (*Result, error) {
	res := &Result{}
	if err := c.lookup(ctx, model, table, keys, nil, res); err != nil {
		return nil, err
	}
	return res, nil
}

// LookupAt is Lookup pinned to version; a version the node can no longer read fails with
// FailedPrecondition.
func (c *Client) LookupAt(ctx context.Context, model, table string, keys []uint64, version uint64) (*Result, error) {
	res := &Result{}
	if err := c.lookup(ctx, model, table, keys, &version, res); err != nil {
		return nil, err
	}
	return res, nil
}

// LookupInto is Lookup writing into res, reusing its Values and Found when they are large
// enough: a loop that looks up batch after batch allocates (and collects) nothing per call.
// res is overwritten, also on error; do not share it between goroutines.
func (c *Client) LookupInto(ctx context.Context, model, table string, keys []uint64, res *Result) error {
	return c.lookup(ctx, model, table, keys, nil, res)
}

func (c *Client) lookup(ctx context.Context, model, table string, keys []uint64, version *uint64, res *Result) error {
	dim, err := c.TableDim(ctx, model, table)
	if err != nil {
		return err
	}
	op := opName{"lookup", model, table}
	n := len(keys)
	if cap(res.bitmap) < (n+7)/8 {
		res.bitmap = make([]byte, (n+7)/8)
	}
	bitmap := res.bitmap[:(n+7)/8]
	// A table re-created with another dim makes the first try too small (OutOfRange with the
	// new dim); the second try then fits.
	for attempt := 0; ; attempt++ {
		if cap(res.Values) < n*dim {
			res.Values = make([]float32, n*dim)
		}
		values := res.Values[:n*dim]
		var gotDim C.uint32_t
		var gotVersion C.uint64_t
		err = c.do(ctx, op, func(h *C.hopps_client, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t {
			return withNames(model, table, func(cmodel, ctable *C.char) C.int32_t {
				return C.hopps_lookup(h, cmodel, ctable, keysPtr(keys), C.size_t(n), (*C.uint64_t)(version),
					floatsPtr(values), C.size_t(len(values)), bytesPtr(bitmap), C.size_t(len(bitmap)),
					&gotDim, &gotVersion, timeout, cerr)
			})
		})
		if CodeOf(err) == OutOfRange && attempt == 0 && int(gotDim) != dim {
			dim = int(gotDim)
			c.rememberDim(tableRef{model, table}, uint32(gotDim))
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				// The call may have been abandoned while still writing into these buffers:
				// let it keep them, and give res fresh ones next time.
				res.Values, res.Found, res.bitmap = nil, nil, nil
			}
			return err
		}
		if cap(res.Found) < n {
			res.Found = make([]bool, n)
		}
		res.Values = values[:n*int(gotDim)]
		res.Dim = int(gotDim)
		res.Found = unpackBitmap(bitmap, n, res.Found[:n])
		res.Version = uint64(gotVersion)
		return nil
	}
}

// TableKeys names the keys to look up in one table of a MultiLookup.
type TableKeys struct {
	Table string
	Keys  []uint64
}

// TableResult is the answer for one table of a MultiLookup.
type TableResult struct {
	Table string
	Result
}

// MultiResult is the answer of a MultiLookup: one entry per requested table, in request order,
// all read at one version.
type MultiResult struct {
	Version uint64
	Tables  []TableResult
}

// MultiLookup reads keys from several tables of model in one call, all at one version.
func (c *Client) MultiLookup(ctx context.Context, model string, tables []TableKeys) (*MultiResult, error) {
	op := opName{verb: "multi-lookup", model: model}
	n := len(tables)
	if n == 0 {
		return &MultiResult{}, nil
	}
	counts := make([]C.size_t, n)
	dims := make([]int, n)
	total := 0
	for i, t := range tables {
		dim, err := c.TableDim(ctx, model, t.Table)
		if err != nil {
			return nil, err
		}
		dims[i] = dim
		counts[i] = C.size_t(len(t.Keys))
		total += len(t.Keys)
	}
	keys := make([]uint64, 0, total)
	for _, t := range tables {
		keys = append(keys, t.Keys...)
	}
	bitmap := make([]byte, (total+7)/8)
	gotDims := make([]C.uint32_t, n)
	for attempt := 0; ; attempt++ {
		floats := 0
		for i, t := range tables {
			floats += len(t.Keys) * dims[i]
		}
		values := make([]float32, floats)
		var gotVersion C.uint64_t
		err := c.do(ctx, op, func(h *C.hopps_client, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t {
			// A Go array of C pointers may be passed to C (it holds no Go pointers).
			names := make([]*C.char, n)
			for i, t := range tables {
				names[i] = cString(t.Table)
			}
			defer func() {
				for _, name := range names {
					C.free(unsafe.Pointer(name))
				}
			}()
			cmodel := cString(model)
			defer C.free(unsafe.Pointer(cmodel))
			return C.hopps_multi_lookup(h, cmodel, &names[0], &counts[0], C.size_t(n), keysPtr(keys), nil,
				floatsPtr(values), C.size_t(len(values)), bytesPtr(bitmap), C.size_t(len(bitmap)),
				&gotDims[0], &gotVersion, timeout, cerr)
		})
		if CodeOf(err) == OutOfRange && attempt == 0 {
			for i := range dims {
				dims[i] = int(gotDims[i])
				c.rememberDim(tableRef{model, tables[i].Table}, uint32(gotDims[i]))
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		found := unpackBitmap(bitmap, total, make([]bool, total))
		out := &MultiResult{Version: uint64(gotVersion), Tables: make([]TableResult, n)}
		valueAt, keyAt := 0, 0
		for i, t := range tables {
			dim := int(gotDims[i])
			rows := len(t.Keys)
			out.Tables[i] = TableResult{Table: t.Table, Result: Result{
				Values:  values[valueAt : valueAt+rows*dim : valueAt+rows*dim],
				Dim:     dim,
				Found:   found[keyAt : keyAt+rows : keyAt+rows],
				Version: uint64(gotVersion),
			}}
			valueAt += rows * dim
			keyAt += rows
		}
		return out, nil
	}
}

// WriteAck is what the node acknowledged for a write.
type WriteAck struct {
	// Version is the version the write was applied on top of.
	Version uint64
	// Rows is the number of rows written.
	Rows uint64
	// Sequence is the write-ahead-log sequence number (0 when not logged).
	Sequence uint64
}

type writeCall func(h *C.hopps_client, model, table *C.char, ack *C.hopps_write_ack, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t

func (c *Client) write(ctx context.Context, op, model, table string, call writeCall) (WriteAck, error) {
	var ack C.hopps_write_ack
	err := c.do(ctx, opName{op, model, table},
		func(h *C.hopps_client, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t {
			return withNames(model, table, func(cmodel, ctable *C.char) C.int32_t {
				return call(h, cmodel, ctable, &ack, timeout, cerr)
			})
		})
	if err != nil {
		return WriteAck{}, err
	}
	return WriteAck{Version: uint64(ack.version), Rows: uint64(ack.rows), Sequence: uint64(ack.sequence)}, nil
}

// Upsert inserts or overwrites rows: values holds len(keys) * dim floats, row after row.
// The rows are durable on the node once Upsert returns without error.
func (c *Client) Upsert(ctx context.Context, model, table string, keys []uint64, values []float32) (WriteAck, error) {
	return c.write(ctx, "upsert", model, table,
		func(h *C.hopps_client, m, t *C.char, ack *C.hopps_write_ack, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t {
			return C.hopps_upsert(h, m, t, keysPtr(keys), C.size_t(len(keys)), floatsPtr(values),
				C.size_t(len(values)), ack, timeout, cerr)
		})
}

// Delete removes rows.
func (c *Client) Delete(ctx context.Context, model, table string, keys []uint64) (WriteAck, error) {
	return c.write(ctx, "delete", model, table,
		func(h *C.hopps_client, m, t *C.char, ack *C.hopps_write_ack, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t {
			return C.hopps_delete(h, m, t, keysPtr(keys), C.size_t(len(keys)), ack, timeout, cerr)
		})
}

// Push applies gradients (len(keys) * dim floats) with the table's server-side optimizer.
func (c *Client) Push(ctx context.Context, model, table string, keys []uint64, gradients []float32) (WriteAck, error) {
	return c.write(ctx, "push", model, table,
		func(h *C.hopps_client, m, t *C.char, ack *C.hopps_write_ack, timeout C.uint32_t, cerr **C.hopps_error) C.int32_t {
			return C.hopps_push(h, m, t, keysPtr(keys), C.size_t(len(keys)), floatsPtr(gradients),
				C.size_t(len(gradients)), ack, timeout, cerr)
		})
}

// The pointer helpers pass Go slices of plain numbers to C, which cgo allows for the duration
// of a call (they hold no Go pointers); an empty slice is NULL with length 0.
func keysPtr(s []uint64) *C.uint64_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.uint64_t)(unsafe.Pointer(&s[0]))
}

func floatsPtr(s []float32) *C.float {
	if len(s) == 0 {
		return nil
	}
	return (*C.float)(unsafe.Pointer(&s[0]))
}

func bytesPtr(s []byte) *C.uint8_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.uint8_t)(unsafe.Pointer(&s[0]))
}

// unpackBitmap expands the first n bits of an LSB-first bitmap into out.
func unpackBitmap(bitmap []byte, n int, out []bool) []bool {
	for i := 0; i < n; i++ {
		out[i] = bitmap[i>>3]&(1<<(uint(i)&7)) != 0
	}
	return out
}
