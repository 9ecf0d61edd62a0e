module github.com/hopps-rs/hopps/go

go 1.19
