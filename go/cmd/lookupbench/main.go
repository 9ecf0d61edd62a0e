// Command lookupbench compares 1000-key lookups from Go (this package over libhopps) with the
// Rust client, against one hopps node, in one run: rounds alternate Go and Rust, and the
// report gives the median over rounds of each side's p50 latency and keys/s, and their ratio.
//
//	lookupbench -addr 127.0.0.1:PORT -rust target/release/examples/rust_lookup_bench
//
// The node must serve model "bench" table "emb" (publish_fixture --bench-keys N publishes it).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"

	"github.com/hopps-rs/hopps/go/hopps"
)

// keyGen is xorshift64*, the same generator as the Rust side, so both look up alike keys.
type keyGen uint64

func (g *keyGen) next(space uint64) uint64 {
	x := uint64(*g)
	x ^= x >> 12
	x ^= x << 25
	x ^= x >> 27
	*g = keyGen(x)
	return (x * 0x2545F4914F6CDD1D) % space
}

type sample struct {
	p50, p99 time.Duration
	keysPerS float64
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// goRound measures iterations lookups from Go; withDeadline gives each call a context deadline
// (the path a request handler takes), otherwise context.Background.
func goRound(client *hopps.Client, model, table string, perLookup int, space uint64, iterations int, seed uint64, withDeadline, reuse bool) (sample, error) {
	gen := keyGen(seed | 1)
	keys := make([]uint64, perLookup)
	lat := make([]time.Duration, 0, iterations)
	var reused hopps.Result
	lookup := func() (*hopps.Result, error) {
		for i := range keys {
			keys[i] = gen.next(space)
		}
		if reuse {
			return &reused, client.LookupInto(context.Background(), model, table, keys, &reused)
		}
		if !withDeadline {
			return client.Lookup(context.Background(), model, table, keys)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return client.Lookup(ctx, model, table, keys)
	}
	for i := 0; i < iterations/10+1; i++ {
		if _, err := lookup(); err != nil {
			return sample{}, err
		}
	}
	start := time.Now()
	for i := 0; i < iterations; i++ {
		t := time.Now()
		res, err := lookup()
		lat = append(lat, time.Since(t))
		if err != nil {
			return sample{}, err
		}
		if len(res.Found) != perLookup {
			return sample{}, fmt.Errorf("asked %d keys, got %d rows", perLookup, len(res.Found))
		}
	}
	total := time.Since(start)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pick := func(q float64) time.Duration { return lat[int(float64(len(lat)-1)*q+0.5)] }
	return sample{p50: pick(0.5), p99: pick(0.99), keysPerS: float64(iterations*perLookup) / total.Seconds()}, nil
}

func rustRound(bin, addr, model, table string, perLookup int, space uint64, iterations int, seed uint64) (sample, error) {
	out, err := exec.Command(bin, addr, model, table, fmt.Sprint(perLookup), fmt.Sprint(space),
		fmt.Sprint(iterations), fmt.Sprint(seed)).Output()
	if err != nil {
		if exit, ok := err.(*exec.ExitError); ok {
			return sample{}, fmt.Errorf("%s: %v: %s", bin, err, exit.Stderr)
		}
		return sample{}, fmt.Errorf("%s: %v", bin, err)
	}
	var p50, p99, kps float64
	if _, err := fmt.Sscanf(strings.TrimSpace(string(out)), "rust p50_us=%g p99_us=%g keys_per_s=%g", &p50, &p99, &kps); err != nil {
		return sample{}, fmt.Errorf("cannot read %q from %s: %v", out, bin, err)
	}
	us := func(v float64) time.Duration { return time.Duration(v * float64(time.Microsecond)) }
	return sample{p50: us(p50), p99: us(p99), keysPerS: kps}, nil
}

func main() {
	addr := flag.String("addr", "", "hopps node (host:port)")
	rust := flag.String("rust", "", "path of the rust_lookup_bench example binary")
	model := flag.String("model", "bench", "model")
	table := flag.String("table", "emb", "table")
	perLookup := flag.Int("keys", 1000, "keys per lookup")
	space := flag.Uint64("key-space", 100000, "keys are drawn from 0..key-space")
	iterations := flag.Int("iterations", 300, "lookups per round and side")
	rounds := flag.Int("rounds", 7, "rounds; each runs every side once, in rotating order")
	workers := flag.Int("worker-threads", 0, "threads of libhopps' runtime (0: one per core)")
	flag.Parse()
	if *addr == "" || *rust == "" || *rounds < 1 || *iterations < 1 {
		fmt.Fprintln(os.Stderr, "usage: lookupbench -addr ADDR -rust PATH [-keys 1000 -iterations 300 -rounds 7]")
		os.Exit(2)
	}
	client, err := hopps.Dial(*addr, hopps.WithWorkerThreads(*workers))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()

	sides := []string{"rust client", "go Lookup, context.Background", "go Lookup, context with deadline", "go LookupInto (buffers reused)"}
	samples := make([][]sample, len(sides))
	for r := 0; r < *rounds; r++ {
		seed := uint64(r)*7919 + 1
		// The order within a round rotates, so no side always runs right after another.
		for k := 0; k < len(sides); k++ {
			side := (r + k) % len(sides)
			var s sample
			var err error
			switch side {
			case 0:
				s, err = rustRound(*rust, *addr, *model, *table, *perLookup, *space, *iterations, seed)
			case 1:
				s, err = goRound(client, *model, *table, *perLookup, *space, *iterations, seed, false, false)
			case 2:
				s, err = goRound(client, *model, *table, *perLookup, *space, *iterations, seed, true, false)
			default:
				s, err = goRound(client, *model, *table, *perLookup, *space, *iterations, seed, false, true)
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "round %d, %s: %v\n", r, sides[side], err)
				os.Exit(1)
			}
			samples[side] = append(samples[side], s)
		}
	}
	medians := make([][3]float64, len(sides))
	for i, ss := range samples {
		var p50, p99, kps []float64
		for _, s := range ss {
			p50 = append(p50, float64(s.p50.Microseconds()))
			p99 = append(p99, float64(s.p99.Microseconds()))
			kps = append(kps, s.keysPerS)
		}
		medians[i] = [3]float64{median(p50), median(p99), median(kps)}
	}
	fmt.Printf("%d-key lookups, one caller in a closed loop, %d rounds x %d lookups per side (medians over rounds)\n\n",
		*perLookup, *rounds, *iterations)
	fmt.Println("| client | p50 latency | p99 latency | keys/s | p50 vs Rust |")
	fmt.Println("|---|---|---|---|---|")
	for i, name := range sides {
		m := medians[i]
		fmt.Printf("| %s | %.0f µs | %.0f µs | %.0f | %+.1f%% |\n", name, m[0], m[1], m[2], (m[0]/medians[0][0]-1)*100)
	}
}
