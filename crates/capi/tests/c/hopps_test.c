/*
 * The C ABI's test program: runs against a live hopps node whose repository holds the fixture
 * of crates/capi/examples/publish_fixture.rs (model "capi": table "user", dim 4, keys 0..2000,
 * float j of key k = k + j/8; table "item", dim 8, keys 0..500, float j = -k - j/4).
 *
 *   HOPPS_TEST_ADDR=127.0.0.1:PORT ./hopps_test
 *
 * go/test.sh builds and runs it. Prints "N passed, N failed" and exits non-zero on a failure.
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hopps.h"

static int passed = 0;
static int failed = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, "\n");                                               \
      return 0;                                                            \
    }                                                                      \
  } while (0)

static void run(const char *name, int (*test)(hopps_client *), hopps_client *client) {
  if (test(client)) {
    passed++;
    printf("ok   %s\n", name);
  } else {
    failed++;
    printf("FAIL %s\n", name);
  }
  fflush(stdout);
}

static float user_value(uint64_t k, uint32_t j) { return (float)k + (float)j / 8.0f; }
static float item_value(uint64_t k, uint32_t j) { return -(float)k - (float)j / 4.0f; }
static int bit(const uint8_t *bitmap, size_t i) { return (bitmap[i / 8] >> (i % 8)) & 1; }

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Code and message of a failed call; frees the error. */
static int take(hopps_error *err, char *message, size_t cap) {
  int code = hopps_error_code(err);
  snprintf(message, cap, "%s", hopps_error_message(err));
  hopps_error_free(err);
  return code;
}

static int test_table_dim(hopps_client *c) {
  uint32_t dim = 0;
  hopps_error *err = NULL;
  int rc = hopps_table_dim(c, "capi", "user", &dim, 5000, &err);
  CHECK(rc == HOPPS_OK, "%s", hopps_error_message(err));
  CHECK(err == NULL, "err is cleared on success");
  CHECK(dim == 4, "user dim %u", dim);
  rc = hopps_table_dim(c, "capi", "item", &dim, 5000, &err);
  CHECK(rc == HOPPS_OK && dim == 8, "item dim %u rc %d", dim, rc);
  rc = hopps_table_dim(c, "capi", "no_such_table", &dim, 5000, &err);
  char message[512];
  CHECK(rc == HOPPS_NOT_FOUND, "rc %d", rc);
  CHECK(take(err, message, sizeof message) == HOPPS_NOT_FOUND, "code");
  CHECK(strstr(message, "no_such_table") != NULL, "message names the table: %s", message);
  return 1;
}

static int test_exact_values_and_missing_keys(hopps_client *c) {
  const uint64_t keys[] = {0, 1, 1999, 5000, 7, 123456789, 42, 3, 2};
  const size_t n = sizeof keys / sizeof keys[0];
  float values[9 * 4];
  uint8_t found[2] = {0xff, 0xff};
  uint32_t dim = 0;
  uint64_t version = 0;
  hopps_error *err = NULL;
  memset(values, 0x7f, sizeof values);
  int rc = hopps_lookup(c, "capi", "user", keys, n, NULL, values, n * 4, found, sizeof found, &dim,
                        &version, 5000, &err);
  CHECK(rc == HOPPS_OK, "%s", hopps_error_message(err));
  CHECK(dim == 4, "dim %u", dim);
  CHECK(version > 0, "version %llu", (unsigned long long)version);
  for (size_t i = 0; i < n; i++) {
    int present = keys[i] < 2000;
    CHECK(bit(found, i) == present, "key %llu found bit %d", (unsigned long long)keys[i], bit(found, i));
    for (uint32_t j = 0; j < dim; j++) {
      float want = present ? user_value(keys[i], j) : 0.0f;
      CHECK(values[i * dim + j] == want, "key %llu float %u: got %g want %g",
            (unsigned long long)keys[i], j, values[i * dim + j], want);
    }
  }
  /* Bits past the last key are cleared, not left as they were. */
  CHECK((found[1] & 0xfe) == 0, "padding bits %#x", found[1]);

  /* Pinning the version that was just served reads the same rows. */
  float pinned[9 * 4];
  rc = hopps_lookup(c, "capi", "user", keys, n, &version, pinned, n * 4, found, sizeof found, NULL,
                    NULL, 5000, &err);
  CHECK(rc == HOPPS_OK, "%s", hopps_error_message(err));
  CHECK(memcmp(pinned, values, sizeof values) == 0, "pinned rows differ");
  return 1;
}

static int test_small_buffer_reports_dim(hopps_client *c) {
  const uint64_t keys[] = {1, 2, 3};
  float values[4];
  uint8_t found[1];
  uint32_t dim = 0;
  hopps_error *err = NULL;
  int rc = hopps_lookup(c, "capi", "item", keys, 3, NULL, values, 4, found, 1, &dim, NULL, 5000,
                        &err);
  char message[512];
  CHECK(rc == HOPPS_OUT_OF_RANGE, "rc %d", rc);
  take(err, message, sizeof message);
  CHECK(dim == 8, "the dim is reported so the caller can grow the buffer: %u", dim);
  CHECK(strstr(message, "item") != NULL, "message names the table: %s", message);
  /* A short found bitmap is refused before any request. */
  rc = hopps_lookup(c, "capi", "item", keys, 3, NULL, values, 4, NULL, 0, &dim, NULL, 5000, NULL);
  CHECK(rc == HOPPS_INVALID_ARGUMENT, "rc %d", rc);
  return 1;
}

static int test_unknown_model(hopps_client *c) {
  const uint64_t keys[] = {1};
  float values[4];
  uint8_t found[1];
  hopps_error *err = NULL;
  int rc = hopps_lookup(c, "no_such_model", "user", keys, 1, NULL, values, 4, found, 1, NULL, NULL,
                        5000, &err);
  char message[512];
  CHECK(rc == HOPPS_NOT_FOUND, "rc %d (%s)", rc, hopps_code_name(rc));
  CHECK(take(err, message, sizeof message) == HOPPS_NOT_FOUND, "error code");
  CHECK(strstr(message, "no_such_model") != NULL, "message names the model: %s", message);
  CHECK(strcmp(hopps_code_name(rc), "NOT_FOUND") == 0, "code name");
  return 1;
}

static int test_null_arguments(hopps_client *c) {
  hopps_error *err = NULL;
  float values[4];
  uint8_t found[1];
  int rc = hopps_lookup(c, NULL, "user", NULL, 0, NULL, values, 4, found, 1, NULL, NULL, 0, &err);
  char message[512];
  CHECK(rc == HOPPS_INVALID_ARGUMENT, "rc %d", rc);
  take(err, message, sizeof message);
  CHECK(strstr(message, "model is NULL") != NULL, "%s", message);
  rc = hopps_lookup(c, "capi", "user", NULL, 3, NULL, values, 4, found, 1, NULL, NULL, 0, NULL);
  CHECK(rc == HOPPS_INVALID_ARGUMENT, "NULL keys with n_keys 3: rc %d", rc);
  return 1;
}

static int test_multi_lookup(hopps_client *c) {
  const char *tables[] = {"user", "item"};
  const size_t counts[] = {3, 2};
  const uint64_t keys[] = {5, 9999, 10, /* item: */ 499, 500};
  float values[3 * 4 + 2 * 8];
  uint8_t found[1] = {0xff};
  uint32_t dims[2] = {0, 0};
  uint64_t version = 0;
  hopps_error *err = NULL;
  int rc = hopps_multi_lookup(c, "capi", tables, counts, 2, keys, NULL, values,
                              sizeof values / sizeof values[0], found, 1, dims, &version, 5000, &err);
  CHECK(rc == HOPPS_OK, "%s", hopps_error_message(err));
  CHECK(dims[0] == 4 && dims[1] == 8, "dims %u %u", dims[0], dims[1]);
  CHECK(version > 0, "version");
  const int want_found[] = {1, 0, 1, 1, 0};
  for (size_t i = 0; i < 5; i++) CHECK(bit(found, i) == want_found[i], "found bit %zu", i);
  CHECK((found[0] & 0xe0) == 0, "padding bits %#x", found[0]);
  for (uint32_t j = 0; j < 4; j++) {
    CHECK(values[j] == user_value(5, j), "user 5 float %u", j);
    CHECK(values[4 + j] == 0.0f, "user 9999 is zeros");
    CHECK(values[8 + j] == user_value(10, j), "user 10 float %u", j);
  }
  for (uint32_t j = 0; j < 8; j++) {
    CHECK(values[12 + j] == item_value(499, j), "item 499 float %u: %g", j, values[12 + j]);
    CHECK(values[20 + j] == 0.0f, "item 500 is zeros");
  }
  return 1;
}

static int test_upsert_then_lookup(hopps_client *c) {
  /* Keys from 2,000,000 up are the C suite's own; the Go suite writes elsewhere. */
  const uint64_t keys[] = {2000001, 2000002};
  const float rows[] = {1.5f, -2.5f, 3.25f, 4.0f, 0.5f, 0.25f, 0.125f, -8.0f};
  hopps_write_ack ack;
  memset(&ack, 0, sizeof ack);
  hopps_error *err = NULL;
  int rc = hopps_upsert(c, "capi", "user", keys, 2, rows, 8, &ack, 5000, &err);
  CHECK(rc == HOPPS_OK, "%s", hopps_error_message(err));
  CHECK(ack.rows == 2, "ack rows %llu", (unsigned long long)ack.rows);
  float values[8];
  uint8_t found[1];
  rc = hopps_lookup(c, "capi", "user", keys, 2, NULL, values, 8, found, 1, NULL, NULL, 5000, &err);
  CHECK(rc == HOPPS_OK, "%s", hopps_error_message(err));
  CHECK((found[0] & 3) == 3, "both keys found after the upsert: %#x", found[0]);
  CHECK(memcmp(values, rows, sizeof rows) == 0, "rows read back as written");
  /* A row count that is not a whole number of rows is refused before any request. */
  rc = hopps_upsert(c, "capi", "user", keys, 2, rows, 7, NULL, 5000, NULL);
  CHECK(rc == HOPPS_INVALID_ARGUMENT, "7 floats for 2 keys: rc %d", rc);
  /* The server checks the dim. */
  rc = hopps_upsert(c, "capi", "user", keys, 1, rows, 3, NULL, 5000, &err);
  CHECK(rc != HOPPS_OK, "3 floats for a dim-4 row accepted");
  hopps_error_free(err);
  return 1;
}

/* A listener that never accepts: the kernel completes TCP handshakes, nobody answers. */
static int silent_listener(int *port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 16) != 0 ||
      getsockname(fd, (struct sockaddr *)&addr, &len) != 0) {
    close(fd);
    return -1;
  }
  *port = ntohs(addr.sin_port);
  return fd;
}

static int test_deadline_expires(hopps_client *unused) {
  (void)unused;
  int port = 0;
  int fd = silent_listener(&port);
  CHECK(fd >= 0, "cannot open a listener");
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
  hopps_options options;
  memset(&options, 0, sizeof options);
  options.connect_timeout_ms = 2000;
  hopps_client *silent = NULL;
  hopps_error *err = NULL;
  double start = now_ms();
  int rc = hopps_connect(addr, &options, &silent, &err);
  if (rc == HOPPS_OK) {
    const uint64_t keys[] = {1};
    float values[4];
    uint8_t found[1];
    start = now_ms();
    rc = hopps_lookup(silent, "capi", "user", keys, 1, NULL, values, 4, found, 1, NULL, NULL, 200,
                      &err);
    hopps_client_free(silent);
  }
  double elapsed = now_ms() - start;
  close(fd);
  char message[512];
  CHECK(rc == HOPPS_DEADLINE_EXCEEDED, "rc %d (%s)", rc, hopps_code_name(rc));
  take(err, message, sizeof message);
  CHECK(elapsed >= 150 && elapsed < 1500, "returned after %.0f ms for a 200 ms deadline", elapsed);
  CHECK(strstr(message, "200 ms") != NULL, "message names the deadline: %s", message);
  return 1;
}

struct worker {
  hopps_client *client;
  int id;
  int errors;
};

static void *lookup_worker(void *arg) {
  struct worker *w = arg;
  uint64_t keys[64];
  float values[64 * 4];
  uint8_t found[8];
  for (int round = 0; round < 100; round++) {
    for (int i = 0; i < 64; i++) keys[i] = (uint64_t)((w->id * 131 + round * 17 + i * 7) % 2100);
    hopps_error *err = NULL;
    int rc = hopps_lookup(w->client, "capi", "user", keys, 64, NULL, values, 64 * 4, found,
                          sizeof found, NULL, NULL, 10000, &err);
    if (rc != HOPPS_OK) {
      fprintf(stderr, "worker %d: %s\n", w->id, hopps_error_message(err));
      hopps_error_free(err);
      w->errors++;
      continue;
    }
    for (int i = 0; i < 64; i++) {
      int present = keys[i] < 2000;
      if (bit(found, (size_t)i) != present) w->errors++;
      for (uint32_t j = 0; j < 4; j++) {
        float want = present ? user_value(keys[i], j) : 0.0f;
        if (values[i * 4 + j] != want) w->errors++;
      }
    }
  }
  return NULL;
}

static int test_threads_share_one_handle(hopps_client *c) {
  enum { THREADS = 8 };
  pthread_t threads[THREADS];
  struct worker workers[THREADS];
  for (int i = 0; i < THREADS; i++) {
    workers[i].client = c;
    workers[i].id = i;
    workers[i].errors = 0;
    CHECK(pthread_create(&threads[i], NULL, lookup_worker, &workers[i]) == 0, "pthread_create");
  }
  int errors = 0;
  for (int i = 0; i < THREADS; i++) {
    pthread_join(threads[i], NULL);
    errors += workers[i].errors;
  }
  CHECK(errors == 0, "%d wrong rows or failed calls across %d threads", errors, THREADS);
  return 1;
}

static int test_connect_errors(hopps_client *unused) {
  (void)unused;
  hopps_client *c = (hopps_client *)&passed; /* must be overwritten with NULL */
  hopps_error *err = NULL;
  int rc = hopps_connect("not an address\n", NULL, &c, &err);
  char message[512];
  CHECK(rc == HOPPS_INVALID_ARGUMENT, "rc %d", rc);
  CHECK(c == NULL, "a failed connect leaves no handle");
  take(err, message, sizeof message);
  CHECK(strstr(message, "not an address") != NULL, "%s", message);
  return 1;
}

int main(void) {
  const char *addr = getenv("HOPPS_TEST_ADDR");
  if (addr == NULL || addr[0] == '\0') {
    fprintf(stderr, "set HOPPS_TEST_ADDR to a hopps node serving the test fixture (go/test.sh does)\n");
    return 2;
  }
  printf("libhopps %s against %s\n", hopps_version(), addr);
  hopps_client *client = NULL;
  hopps_error *err = NULL;
  if (hopps_connect(addr, NULL, &client, &err) != HOPPS_OK) {
    fprintf(stderr, "cannot connect: %s\n", hopps_error_message(err));
    hopps_error_free(err);
    printf("0 passed, 1 failed\n");
    return 1;
  }
  run("table_dim", test_table_dim, client);
  run("exact_values_and_missing_keys", test_exact_values_and_missing_keys, client);
  run("small_buffer_reports_dim", test_small_buffer_reports_dim, client);
  run("unknown_model", test_unknown_model, client);
  run("null_arguments", test_null_arguments, client);
  run("multi_lookup", test_multi_lookup, client);
  run("upsert_then_lookup", test_upsert_then_lookup, client);
  run("deadline_expires", test_deadline_expires, client);
  run("threads_share_one_handle", test_threads_share_one_handle, client);
  run("connect_errors", test_connect_errors, client);
  hopps_client_free(client);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
