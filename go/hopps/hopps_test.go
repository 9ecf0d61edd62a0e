package hopps

// These tests run against a live hopps node serving the fixture of
// crates/capi/examples/publish_fixture.rs; go/test.sh publishes it, starts the node and sets
// HOPPS_TEST_ADDR. Model "capi": table "user" (dim 4, keys 0..2000, float j of key k = k + j/8)
// and table "item" (dim 8, keys 0..500, float j = -k - j/4); missing keys read as zeros.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

var testAddr string

func TestMain(m *testing.M) {
	testAddr = os.Getenv("HOPPS_TEST_ADDR")
	if testAddr == "" {
		fmt.Fprintln(os.Stderr, "HOPPS_TEST_ADDR is not set: run go/test.sh, which starts a hopps node "+
			"with the test fixture and sets it")
		os.Exit(2)
	}
	os.Exit(m.Run())
}

func dial(t *testing.T) *Client {
	t.Helper()
	client, err := Dial(testAddr, WithConnectTimeout(5*time.Second))
	if err != nil {
		t.Fatalf("dial %s: %v", testAddr, err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func userValue(k uint64, j int) float32 { return float32(k) + float32(j)/8 }
func itemValue(k uint64, j int) float32 { return -float32(k) - float32(j)/4 }

func checkRows(t *testing.T, res *Result, keys []uint64, present func(uint64) bool, value func(uint64, int) float32) {
	t.Helper()
	if len(res.Found) != len(keys) || len(res.Values) != len(keys)*res.Dim {
		t.Fatalf("%d keys: got %d found flags and %d floats (dim %d)", len(keys), len(res.Found), len(res.Values), res.Dim)
	}
	for i, k := range keys {
		want := present(k)
		if res.Found[i] != want {
			t.Errorf("key %d: found=%v, want %v", k, res.Found[i], want)
		}
		for j, got := range res.Row(i) {
			expected := float32(0)
			if want {
				expected = value(k, j)
			}
			if got != expected {
				t.Errorf("key %d float %d: got %v, want %v", k, j, got, expected)
			}
		}
	}
}

func TestLookupExactValuesAndMissingKeys(t *testing.T) {
	client := dial(t)
	keys := []uint64{0, 1, 1999, 2000, 5000, 7, 1 << 40, 3}
	res, err := client.Lookup(context.Background(), "capi", "user", keys)
	if err != nil {
		t.Fatal(err)
	}
	if res.Dim != 4 || res.Version == 0 {
		t.Fatalf("dim %d version %d", res.Dim, res.Version)
	}
	checkRows(t, res, keys, func(k uint64) bool { return k < 2000 }, userValue)

	pinned, err := client.LookupAt(context.Background(), "capi", "user", keys, res.Version)
	if err != nil {
		t.Fatal(err)
	}
	if pinned.Version != res.Version {
		t.Fatalf("pinned to %d, read at %d", res.Version, pinned.Version)
	}
	checkRows(t, pinned, keys, func(k uint64) bool { return k < 2000 }, userValue)
}

func TestLookupWithDeadlineContext(t *testing.T) {
	client := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	keys := []uint64{10, 20, 499, 500}
	res, err := client.Lookup(ctx, "capi", "item", keys)
	if err != nil {
		t.Fatal(err)
	}
	if res.Dim != 8 {
		t.Fatalf("item dim %d", res.Dim)
	}
	checkRows(t, res, keys, func(k uint64) bool { return k < 500 }, itemValue)
}

func TestEmptyLookup(t *testing.T) {
	client := dial(t)
	res, err := client.Lookup(context.Background(), "capi", "user", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Values) != 0 || len(res.Found) != 0 || res.Dim != 4 {
		t.Fatalf("empty lookup: %+v", res)
	}
}

func TestUnknownModelAndTable(t *testing.T) {
	client := dial(t)
	_, err := client.Lookup(context.Background(), "no_such_model", "user", []uint64{1})
	var hoppsErr *Error
	if !errors.As(err, &hoppsErr) {
		t.Fatalf("want *hopps.Error, got %T %v", err, err)
	}
	if hoppsErr.Code != NotFound || CodeOf(err) != NotFound {
		t.Fatalf("code %v, want NOT_FOUND: %v", hoppsErr.Code, err)
	}
	if !strings.Contains(err.Error(), "no_such_model") {
		t.Fatalf("the error does not name the model: %v", err)
	}
	_, err = client.Lookup(context.Background(), "capi", "no_such_table", []uint64{1})
	if CodeOf(err) != NotFound || !strings.Contains(err.Error(), "no_such_table") {
		t.Fatalf("unknown table: %v", err)
	}
}

func TestMultiLookup(t *testing.T) {
	client := dial(t)
	res, err := client.MultiLookup(context.Background(), "capi", []TableKeys{
		{Table: "user", Keys: []uint64{5, 9999, 10}},
		{Table: "item", Keys: []uint64{499, 500}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Tables) != 2 || res.Version == 0 {
		t.Fatalf("got %d tables at version %d", len(res.Tables), res.Version)
	}
	if res.Tables[0].Table != "user" || res.Tables[1].Table != "item" {
		t.Fatalf("tables %q %q", res.Tables[0].Table, res.Tables[1].Table)
	}
	checkRows(t, &res.Tables[0].Result, []uint64{5, 9999, 10}, func(k uint64) bool { return k < 2000 }, userValue)
	checkRows(t, &res.Tables[1].Result, []uint64{499, 500}, func(k uint64) bool { return k < 500 }, itemValue)
}

func TestUpsertThenLookup(t *testing.T) {
	client := dial(t)
	// Keys from 1,000,000 up are this suite's own; the C suite writes from 2,000,000.
	keys := []uint64{1000001, 1000002, 1000003}
	values := []float32{1, 2, 3, 4, -1, -2, -3, -4, 0.5, 0.25, 0.125, 0.0625}
	ack, err := client.Upsert(context.Background(), "capi", "user", keys, values)
	if err != nil {
		t.Fatal(err)
	}
	if ack.Rows != 3 {
		t.Fatalf("ack %+v", ack)
	}
	res, err := client.Lookup(context.Background(), "capi", "user", keys)
	if err != nil {
		t.Fatal(err)
	}
	for i := range keys {
		if !res.Found[i] {
			t.Fatalf("key %d not found after upsert", keys[i])
		}
	}
	for i, v := range values {
		if res.Values[i] != v {
			t.Fatalf("float %d: got %v want %v", i, res.Values[i], v)
		}
	}
	if _, err := client.Upsert(context.Background(), "capi", "user", keys, values[:7]); CodeOf(err) != InvalidArgument {
		t.Fatalf("7 floats for 3 keys: %v", err)
	}
	if _, err := client.Upsert(context.Background(), "nope", "user", keys[:1], values[:4]); CodeOf(err) != NotFound {
		t.Fatalf("upsert into an unknown model: %v", err)
	}
}

// silentNode is a listener that completes TCP handshakes and never answers.
func silentNode(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func TestDeadlineExpires(t *testing.T) {
	client, err := Dial(silentNode(t), WithConnectTimeout(2*time.Second))
	if err != nil {
		t.Fatalf("dial a silent node: %v", err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = client.Lookup(ctx, "capi", "user", []uint64{1})
	elapsed := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want context.DeadlineExceeded, got %v", err)
	}
	if elapsed < 150*time.Millisecond || elapsed > time.Second {
		t.Fatalf("returned after %v for a 200ms deadline", elapsed)
	}
}

func TestCancelReturnsPromptly(t *testing.T) {
	client, err := Dial(silentNode(t), WithConnectTimeout(2*time.Second), WithRequestTimeout(time.Second))
	if err != nil {
		t.Fatalf("dial a silent node: %v", err)
	}
	// No deadline, only cancellation: the call must still return as soon as ctx ends.
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	_, err = client.Upsert(ctx, "capi", "user", []uint64{1}, []float32{1, 2, 3, 4})
	elapsed := time.Since(start)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("want context.Canceled, got %v", err)
	}
	if elapsed > time.Second {
		t.Fatalf("returned after %v, ctx was cancelled after 100ms", elapsed)
	}
	// Close waits for the abandoned call, which its request timeout bounds.
	closed := time.Now()
	client.Close()
	if waited := time.Since(closed); waited > 5*time.Second {
		t.Fatalf("Close waited %v", waited)
	}
}

func TestExpiredContextMakesNoCall(t *testing.T) {
	client := dial(t)
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if _, err := client.Lookup(ctx, "capi", "user", []uint64{1}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("expired context: %v", err)
	}
}

func TestManyGoroutinesShareOneClient(t *testing.T) {
	client := dial(t)
	const goroutines, rounds = 32, 40
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			keys := make([]uint64, 100)
			for r := 0; r < rounds; r++ {
				for i := range keys {
					keys[i] = uint64((g*131 + r*17 + i*7) % 2100)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				res, err := client.Lookup(ctx, "capi", "user", keys)
				cancel()
				if err != nil {
					errs <- err
					return
				}
				for i, k := range keys {
					if res.Found[i] != (k < 2000) {
						errs <- fmt.Errorf("goroutine %d: key %d found=%v", g, k, res.Found[i])
						return
					}
					for j, v := range res.Row(i) {
						want := float32(0)
						if k < 2000 {
							want = userValue(k, j)
						}
						if v != want {
							errs <- fmt.Errorf("goroutine %d: key %d float %d = %v, want %v", g, k, j, v, want)
							return
						}
					}
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClosedClient(t *testing.T) {
	client, err := Dial(testAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	if err := client.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := client.Lookup(context.Background(), "capi", "x", []uint64{1}); !errors.Is(err, ErrClosed) {
		// The dim cache is empty, so the call reaches the closed handle.
		t.Fatalf("lookup after Close: %v", err)
	}
}

func TestDialErrors(t *testing.T) {
	_, err := Dial("not an address\n")
	if CodeOf(err) != InvalidArgument {
		t.Fatalf("malformed address: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = Dial(addr, WithConnectTimeout(2*time.Second))
	if CodeOf(err) != Unavailable || !strings.Contains(err.Error(), addr) {
		t.Fatalf("closed port: %v", err)
	}
}

func TestCodeNames(t *testing.T) {
	if NotFound.String() != "NOT_FOUND" || DeadlineExceeded.String() != "DEADLINE_EXCEEDED" || Code(99).String() != "UNKNOWN" {
		t.Fatalf("names: %v %v %v", NotFound, DeadlineExceeded, Code(99))
	}
	if CodeOf(nil) != OK || CodeOf(context.Canceled) != Canceled || CodeOf(errors.New("x")) != Unknown {
		t.Fatal("CodeOf")
	}
}

func TestLookupIntoReusesBuffers(t *testing.T) {
	client := dial(t)
	var res Result
	first := []uint64{1, 2, 3000, 4}
	if err := client.LookupInto(context.Background(), "capi", "user", first, &res); err != nil {
		t.Fatal(err)
	}
	checkRows(t, &res, first, func(k uint64) bool { return k < 2000 }, userValue)
	values := &res.Values[0]
	second := []uint64{9, 2500, 10}
	if err := client.LookupInto(context.Background(), "capi", "user", second, &res); err != nil {
		t.Fatal(err)
	}
	checkRows(t, &res, second, func(k uint64) bool { return k < 2000 }, userValue)
	if &res.Values[0] != values {
		t.Fatal("a smaller batch did not reuse the values buffer")
	}
}
