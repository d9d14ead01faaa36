// Command etcd is the etcd server, built from the published
// go.etcd.io/etcd/server/v3 module (the upstream main package lives in a
// module whose go.mod relies on local replace directives).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
