// Command lookup looks up keys of one table on a hopps node from Go and prints their rows.
//
//	cargo build --release -p hopps-capi
//	cd examples/go
//	CGO_LDFLAGS="-L$PWD/../../target/release -Wl,-rpath,$PWD/../../target/release" \
//	    go run . -addr 127.0.0.1:7070 -model ctr -table user 1 2 3
//
// It shows the usual pattern: one client per process, a deadline per request, rows and found
// flags in key order, and errors that carry the server's code and message.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/hopps-rs/hopps/go/hopps"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:7070", "hopps node (host:port)")
	model := flag.String("model", "", "model name")
	table := flag.String("table", "", "table name")
	deadline := flag.Duration("deadline", 100*time.Millisecond, "deadline of the lookup")
	flag.Parse()
	if *model == "" || *table == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: lookup -addr ADDR -model MODEL -table TABLE KEY...")
		os.Exit(2)
	}
	keys := make([]uint64, flag.NArg())
	for i, arg := range flag.Args() {
		k, err := strconv.ParseUint(arg, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "key %q is not an unsigned integer\n", arg)
			os.Exit(2)
		}
		keys[i] = k
	}

	client, err := hopps.Dial(*addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *deadline)
	defer cancel()
	res, err := client.Lookup(ctx, *model, *table, keys)
	if err != nil {
		var hoppsErr *hopps.Error
		if errors.As(err, &hoppsErr) {
			fmt.Fprintf(os.Stderr, "lookup failed with %v: %s\n", hoppsErr.Code, hoppsErr.Message)
		} else {
			fmt.Fprintln(os.Stderr, "lookup failed:", err)
		}
		os.Exit(1)
	}
	fmt.Printf("model %s table %s version %d dim %d\n", *model, *table, res.Version, res.Dim)
	for i, k := range keys {
		state := "missing"
		if res.Found[i] {
			state = "found"
		}
		fmt.Printf("%d %s %v\n", k, state, res.Row(i))
	}
}
