module github.com/hopps-rs/hopps/examples/go

go 1.19

require github.com/hopps-rs/hopps/go v0.0.0

// The package lives in this repository: build against it, with no module download.
replace github.com/hopps-rs/hopps/go => ../../go
