// etcd, built from the same module graph as the apiserver so both agree on
// the etcd 3.5 client/server versions.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
