/*
 * Looks up keys of one table on a hopps node and prints their rows.
 *
 *   cc -I crates/capi/include examples/c/lookup.c target/release/libhopps.a -lpthread -ldl -lm -o lookup
 *   ./lookup 127.0.0.1:7070 MODEL TABLE KEY...
 *
 * Shows the usual pattern: learn the table's dim once, size the buffers, look up with a
 * deadline, read the found bitmap, and report errors by code and message.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "hopps.h"

static int fail(const char *what, hopps_error *err) {
  fprintf(stderr, "%s: %s (%s)\n", what, hopps_error_message(err),
          hopps_code_name(hopps_error_code(err)));
  hopps_error_free(err);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s ADDR MODEL TABLE KEY...\n", argv[0]);
    return 2;
  }
  const char *addr = argv[1], *model = argv[2], *table = argv[3];
  size_t n = (size_t)(argc - 4);
  uint64_t *keys = calloc(n, sizeof *keys);
  if (keys == NULL) return 1;
  for (size_t i = 0; i < n; i++) keys[i] = strtoull(argv[4 + i], NULL, 10);

  hopps_client *client = NULL;
  hopps_error *err = NULL;
  if (hopps_connect(addr, NULL, &client, &err) != HOPPS_OK) return fail("connect", err);

  uint32_t dim = 0;
  if (hopps_table_dim(client, model, table, &dim, 1000, &err) != HOPPS_OK) {
    hopps_client_free(client);
    return fail("table dim", err);
  }
  float *values = calloc(n * dim, sizeof *values);
  uint8_t *found = calloc((n + 7) / 8, 1);
  uint64_t version = 0;
  if (values == NULL || found == NULL) return 1;
  /* 100 ms is this example's deadline for the whole call. */
  int rc = hopps_lookup(client, model, table, keys, n, NULL, values, n * dim, found, (n + 7) / 8,
                        &dim, &version, 100, &err);
  if (rc != HOPPS_OK) {
    hopps_client_free(client);
    return fail("lookup", err);
  }
  printf("model %s table %s version %" PRIu64 " dim %u\n", model, table, version, dim);
  for (size_t i = 0; i < n; i++) {
    int hit = (found[i / 8] >> (i % 8)) & 1;
    printf("%" PRIu64 " %s [", keys[i], hit ? "found" : "missing");
    for (uint32_t j = 0; j < dim; j++) printf(j ? ", %g" : "%g", (double)values[i * dim + j]);
    printf("]\n");
  }
  free(values);
  free(found);
  free(keys);
  hopps_client_free(client);
  return 0;
}
