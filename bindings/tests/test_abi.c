/*
 * The C test of libpimcore, built with gcc against pimcore.h and the library
 * (tests/test_cabi.py, .ci/run).  Prints one line per check ("ok" / "FAIL")
 * and exits 0 only if every check passed.
 *
 *   test_abi main DATA_DIR PYTHON [POSTS_PER_THREAD]
 *       everything: errors, a Python SDK client (PYTHON sdk_receiver.py)
 *       receiving what C posts, 4 threads posting, the event callback,
 *       stop and restart on DATA_DIR
 *   test_abi event-kinds DATA_DIR PYTHON
 *       a Python SDK client (PYTHON sdk_editor.py) sends, edits, recalls and
 *       pins: the event callback gets each with its type, kind and fields
 *   test_abi fork DATA_DIR
 *       after fork() every call in the child fails fast with PIM_ERR_INIT
 *   test_abi last-error-utf8 DATA_DIR
 *       an error text cut to fit is still valid UTF-8
 *   test_abi argument-checks DATA_DIR
 *       the header version, empty ids, strings not UTF-8, ... as documented
 *   test_abi callback-race DATA_DIR
 *       two threads set one consumer's event callback at once, then one
 *       removes it: no call after the removal, never two calls at once,
 *       ids in order
 *   test_abi cross-stop DATA_DIR
 *       two brokers whose event callbacks stop each other: one stop gets
 *       PIM_ERR_WOULD_DEADLOCK, the other stops its broker, nothing hangs
 *   test_abi setcb-stop DATA_DIR
 *       pim_set_event_callback racing pim_broker_stop: PIM_OK or
 *       PIM_ERR_STOPPED, never PIM_ERR_INTERNAL
 *   test_abi init-fails
 *       Python cannot start (the caller sets PIMCORE_PYTHON or PYTHONHOME
 *       wrong): every call says PIM_ERR_INIT, never PIM_OK
 */
#include "pimcore.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures, checks;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        checks++;                                                            \
        if (cond) {                                                          \
            printf("ok   ");                                                 \
        } else {                                                             \
            failures++;                                                      \
            printf("FAIL [%s:%d] ", __FILE__, __LINE__);                     \
        }                                                                    \
        printf(__VA_ARGS__);                                                 \
        printf("\n");                                                        \
        fflush(stdout);                                                      \
    } while (0)

#define CHECK_RC(call, want)                                                 \
    do {                                                                     \
        int rc_ = (call);                                                    \
        CHECK(rc_ == (want), "%s -> %s (want %s) %s", #call, pim_strerror(rc_), \
              pim_strerror(want), rc_ == (want) ? "" : pim_last_error());    \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char config[4096];
static const char *data_dir;

/* ------------------------------------------------------------ events */

#define MAX_POSTS 100000
typedef struct {
    pthread_mutex_t mu;
    unsigned char seen[MAX_POSTS + 1]; /* by seq, conv "load" */
    long messages, duplicates, other_conv;
    uint64_t first_id, last_id;
    int keep;                          /* return PIM_EVENT_KEEP */
} event_log;

static event_log main_log, keeper_log;

static int on_event(const pim_event *ev, void *userdata)
{
    event_log *log = (event_log *)userdata;
    pthread_mutex_lock(&log->mu);
    if (!log->first_id)
        log->first_id = ev->id;
    log->last_id = ev->id;
    if (strcmp(ev->type, "message") == 0 && ev->kind == 0) {
        if (strcmp(ev->conv, "load") == 0 && ev->seq <= MAX_POSTS) {
            if (log->seen[ev->seq])
                log->duplicates++;
            log->seen[ev->seq] = 1;
            log->messages++;
        } else {
            log->other_conv++;
        }
    }
    pthread_mutex_unlock(&log->mu);
    return log->keep ? PIM_EVENT_KEEP : PIM_EVENT_ACK;
}

static long log_messages(event_log *log)
{
    pthread_mutex_lock(&log->mu);
    long n = log->messages;
    pthread_mutex_unlock(&log->mu);
    return n;
}

static int wait_messages(event_log *log, long n, double timeout)
{
    double end = now_s() + timeout;
    while (log_messages(log) < n && now_s() < end)
        usleep(2000);
    return log_messages(log) >= n;
}

/* Callbacks that call back into the library. */
typedef struct {
    pim_broker *b;
    int post_rc, unread_rc, stop_rc, set_cb_rc, free_rc, done;
} reentry;

static int on_loop_reenters(const pim_event *ev, void *userdata)
{
    reentry *r = (reentry *)userdata;
    if (strcmp(ev->type, "message") == 0 && ev->kind == 0 && strcmp(ev->conv, "team") == 0 && !r->done) {
        uint64_t n;
        r->post_rc = pim_post(r->b, "team", NULL, NULL, "x", 1, NULL, NULL, NULL);
        r->unread_rc = pim_unread_count(r->b, "bob", "team", &n);
        __atomic_store_n(&r->done, 1, __ATOMIC_RELEASE);
    }
    return PIM_EVENT_ACK;
}

static int on_thread_reenters(const pim_event *ev, void *userdata)
{
    reentry *r = (reentry *)userdata;
    if (strcmp(ev->type, "message") == 0 && ev->kind == 0 && strcmp(ev->conv, "team") == 0 && !r->done) {
        r->post_rc = pim_post(r->b, "team", NULL, NULL, "from the callback", 17, "cb-post", NULL, NULL);
        r->stop_rc = pim_broker_stop(r->b);
        r->set_cb_rc = pim_set_event_callback(r->b, "reenter", NULL, NULL, 0);
        r->free_rc = pim_broker_free(r->b);
        __atomic_store_n(&r->done, 1, __ATOMIC_RELEASE);
    }
    return PIM_EVENT_ACK;
}

static int wait_flag(int *flag, double timeout)
{
    double end = now_s() + timeout;
    while (!__atomic_load_n(flag, __ATOMIC_ACQUIRE) && now_s() < end)
        usleep(2000);
    return __atomic_load_n(flag, __ATOMIC_ACQUIRE);
}

/* ------------------------------------------------------------ posting threads */

typedef struct {
    pim_broker *b;
    int index, count, errors;
    uint64_t *seqs;
} poster;

static void *post_many(void *arg)
{
    poster *p = (poster *)arg;
    char payload[64], key[64];
    for (int i = 0; i < p->count; i++) {
        int n = snprintf(payload, sizeof payload, "t%d-%d", p->index, i);
        snprintf(key, sizeof key, "k%d-%d", p->index, i);
        if (pim_post(p->b, "load", NULL, NULL, payload, (size_t)n, key, NULL, &p->seqs[i]) != PIM_OK)
            p->errors++;
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* ------------------------------------------------------------ the SDK client */

static void sdk_client_receives(pim_broker *b, const char *python, const char *test_dir, int port)
{
    char *token = NULL;
    CHECK_RC(pim_token_issue(b, "bob", NULL, 600, &token), PIM_OK);
    CHECK(token && strlen(token) > 20, "a token for bob");
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' '%s/sdk_receiver.py' tcp://127.0.0.1:%d '%s' phone sdk 5", python, test_dir, port,
             token ? token : "");
    pim_free(token);
    FILE *child = popen(cmd, "r");
    CHECK(child != NULL, "the SDK client started");
    if (!child)
        return;
    char line[256];
    int ready = fgets(line, sizeof line, child) && strcmp(line, "ready\n") == 0;
    CHECK(ready, "the SDK client logged in as bob");
    for (int i = 0; i < 5; i++) {
        char payload[32];
        int n = snprintf(payload, sizeof payload, "c-to-sdk-%d", i);
        CHECK_RC(pim_post(b, "sdk", "alice", "c-app", payload, (size_t)n, NULL, NULL, NULL), PIM_OK);
    }
    int got = 0;
    for (int i = 0; i < 5 && fgets(line, sizeof line, child); i++) {
        char want[64];
        snprintf(want, sizeof want, "%d c-to-sdk-%d\n", i + 1, i);
        got += strcmp(line, want) == 0;
    }
    CHECK(got == 5, "the SDK client received the 5 messages C posted, in order (%d)", got);
    CHECK(pclose(child) == 0, "the SDK client exited cleanly");
}

/* ------------------------------------------------------------ the main run */

static int run_main(const char *dir, const char *python, const char *test_dir, int per_thread)
{
    data_dir = dir;
    int major = -1, minor = -1, patch = -1;
    const char *v = pim_version(&major, &minor, &patch);
    CHECK(major == PIM_VERSION_MAJOR && minor == PIM_VERSION_MINOR && patch == PIM_VERSION_PATCH && v && *v,
          "pim_version %s matches the header", v);
    CHECK(pim_version(NULL, NULL, NULL) != NULL, "pim_version takes NULL pointers");
    CHECK(strcmp(pim_strerror(PIM_OK), "success") == 0 && strcmp(pim_strerror(9999), "unknown status code") == 0,
          "pim_strerror");

    pim_broker *b = NULL;
    snprintf(config, sizeof config,
             "{\"data_dir\": \"%s\", \"durability\": \"os\", \"listen\": [\"tcp://127.0.0.1:0\"],"
             " \"server\": {\"events\": true}}", dir);

    /* Start-up errors. */
    CHECK_RC(pim_broker_start(NULL, &b), PIM_ERR_INVALID);
    CHECK_RC(pim_broker_start(config, NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_broker_start("{not json", &b), PIM_ERR_CONFIG);
    CHECK(strstr(pim_last_error(), "JSON") != NULL, "bad JSON is named: %s", pim_last_error());
    CHECK_RC(pim_broker_start("[1, 2]", &b), PIM_ERR_CONFIG);
    CHECK_RC(pim_broker_start("{\"durability\": \"sometimes\"}", &b), PIM_ERR_CONFIG);
    CHECK_RC(pim_broker_start("{\"nonsense\": 1}", &b), PIM_ERR_CONFIG);
    CHECK_RC(pim_broker_start("{\"limits\": {\"window\": \"big\"}}", &b), PIM_ERR_CONFIG);
    /* A JSON escape of a lone surrogate: valid UTF-8 text, no valid string (a trial: PIM_ERR_INVALID and
     * Python's codec words). */
    CHECK_RC(pim_broker_start("{\"data_dir\": \"\\ud800\"}", &b), PIM_ERR_CONFIG);
    CHECK(strstr(pim_last_error(), "data_dir is not valid Unicode") != NULL, "the setting is named: %s", pim_last_error());
    CHECK_RC(pim_broker_start("{\"listen\": [\"tcp://127.0.0.1:0\", \"\\udfff\"]}", &b), PIM_ERR_CONFIG);
    CHECK(strstr(pim_last_error(), "listen[1]") != NULL, "the item is named: %s", pim_last_error());
    {   /* JSON nested past the decoder's limit: an options error, not a bug */
        size_t depth = 100000;
        char *deep = (char *)malloc(2 * depth + 1);
        memset(deep, '[', depth);
        memset(deep + depth, ']', depth);
        deep[2 * depth] = 0;
        CHECK_RC(pim_broker_start(deep, &b), PIM_ERR_CONFIG);
        free(deep);
    }
    CHECK_RC(pim_broker_start_(config, &b, PIM_VERSION_NUMBER + 10000), PIM_ERR_VERSION);
    CHECK_RC(pim_broker_start_(config, &b, PIM_VERSION_NUMBER + 1), PIM_ERR_VERSION);
    CHECK(b == NULL, "no handle after a failed start");

    double t0 = now_s();
    CHECK_RC(pim_broker_start(config, &b), PIM_OK);
    printf("#    start took %.0f ms\n", (now_s() - t0) * 1e3);
    if (!b)
        return 1;
    pim_broker *twice = NULL;
    CHECK_RC(pim_broker_start(config, &twice), PIM_ERR_ALREADY_RUNNING);
    CHECK(twice == NULL, "start twice on one data directory leaves no handle");
    int port = 0;
    CHECK_RC(pim_broker_port(b, &port), PIM_OK);
    CHECK(port > 0, "bound port %d (asked for port 0)", port);
    CHECK_RC(pim_broker_port(b, NULL), PIM_ERR_INVALID);
    char busy[4096];
    snprintf(busy, sizeof busy, "{\"data_dir\": \"%s-busy\", \"listen\": [\"tcp://127.0.0.1:%d\"]}", dir, port);
    CHECK_RC(pim_broker_start(busy, &twice), PIM_ERR_IO);
    CHECK(twice == NULL && *pim_last_error(), "a port in use: %s", pim_last_error());

    /* Groups and argument errors. */
    const char *members[] = {"alice", "bob"};
    const char *with_null[] = {"alice", NULL};
    const char *bad_id[] = {"has space"};
    CHECK_RC(pim_group_create(b, "team", members, 2), PIM_OK);
    CHECK_RC(pim_group_create(b, "sdk", members, 2), PIM_OK);
    CHECK_RC(pim_group_create(b, "load", members, 2), PIM_OK);
    CHECK_RC(pim_group_create(b, "team", members, 2), PIM_ERR_ALREADY_EXISTS);
    CHECK_RC(pim_group_create(b, "g2", with_null, 2), PIM_ERR_INVALID);
    CHECK_RC(pim_group_create(b, "g2", NULL, 2), PIM_ERR_INVALID);
    CHECK_RC(pim_group_create(b, NULL, members, 2), PIM_ERR_INVALID);
    CHECK_RC(pim_group_create(NULL, "g2", members, 2), PIM_ERR_INVALID);
    CHECK_RC(pim_group_create(b, "g2", bad_id, 1), PIM_ERR_INVALID);
    CHECK_RC(pim_group_create(b, "g2", members, 0), PIM_ERR_INVALID); /* a group of no one */
    CHECK_RC(pim_group_add_members(b, "nope", members, 2), PIM_ERR_UNKNOWN_CONVERSATION);
    CHECK_RC(pim_group_remove_members(b, "nope", members, 2), PIM_ERR_UNKNOWN_CONVERSATION);
    const char *carol[] = {"carol"};
    CHECK_RC(pim_group_add_members(b, "team", carol, 1), PIM_OK);
    CHECK_RC(pim_group_remove_members(b, "team", carol, 1), PIM_OK);
    /* Removing every remaining member is refused (no one removed): purge to delete a group. */
    CHECK_RC(pim_group_remove_members(b, "team", members, 2), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "purge") != NULL, "the refusal says to purge: %s", pim_last_error());

    uint8_t id1[16], id2[16];
    uint64_t seq1 = 0, seq2 = 0, n = 0;
    CHECK_RC(pim_post(b, "team", NULL, NULL, "hello", 5, "once", id1, &seq1), PIM_OK);
    CHECK_RC(pim_post(b, "team", NULL, NULL, "hello", 5, "once", id2, &seq2), PIM_OK);
    CHECK(seq1 > 0 && seq2 == seq1 && memcmp(id1, id2, 16) == 0, "an idempotency key makes a retry the same message (seq %llu, %llu)",
          (unsigned long long)seq1, (unsigned long long)seq2);
    CHECK_RC(pim_post(b, "team", NULL, NULL, "other", 5, "once", NULL, NULL), PIM_ERR_DUPLICATE_CONFLICT);
    CHECK_RC(pim_post(b, "team", "alice", "c-app", "hi", 2, NULL, NULL, NULL), PIM_OK);
    CHECK_RC(pim_post(b, "nope", NULL, NULL, "x", 1, NULL, NULL, NULL), PIM_ERR_UNKNOWN_CONVERSATION);
    CHECK(strstr(pim_last_error(), "nope") != NULL, "pim_last_error names the conversation: %s", pim_last_error());
    CHECK_RC(pim_post(b, "team", "mallory", "web", "x", 1, NULL, NULL, NULL), PIM_ERR_NOT_MEMBER);
    CHECK_RC(pim_post(b, NULL, NULL, NULL, "x", 1, NULL, NULL, NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_post(NULL, "team", NULL, NULL, "x", 1, NULL, NULL, NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_post(b, "team", NULL, NULL, NULL, 3, NULL, NULL, NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_post(b, "team", "alice", NULL, "x", 1, NULL, NULL, NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_post(b, "te\xff\xfe", NULL, NULL, "x", 1, NULL, NULL, NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_post(b, "team", NULL, NULL, NULL, 0, NULL, NULL, NULL), PIM_OK); /* an empty payload */
    size_t big_len = 70000;
    char *big = (char *)calloc(1, big_len);
    CHECK_RC(pim_post(b, "team", NULL, NULL, big, big_len, NULL, NULL, NULL), PIM_ERR_PAYLOAD_TOO_LARGE);
    free(big);
    CHECK_RC(pim_unread_count(b, "bob", "team", &n), PIM_OK);
    CHECK(n == 3, "bob has 3 unread in team (%llu)", (unsigned long long)n);
    CHECK_RC(pim_unread_count(b, "bob", "team", NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_unread_count(b, NULL, "team", &n), PIM_ERR_INVALID);

    pim_post_item items[3];
    memset(items, 0, sizeof items);
    items[0].conv = "team"; items[0].payload = "b0"; items[0].len = 2;
    items[1].conv = "nope"; items[1].payload = "b1"; items[1].len = 2;
    items[2].conv = "team"; items[2].sender = "bob"; items[2].device = "c"; items[2].payload = "b2"; items[2].len = 2;
    CHECK_RC(pim_post_batch(b, items, 3), PIM_ERR_UNKNOWN_CONVERSATION);
    CHECK(items[0].status == PIM_OK && items[1].status == PIM_ERR_UNKNOWN_CONVERSATION && items[2].status == PIM_OK
              && items[0].seq && items[2].seq && items[0].seq != items[2].seq,
          "pim_post_batch reports each item (seq %llu, %llu)", (unsigned long long)items[0].seq,
          (unsigned long long)items[2].seq);
    CHECK_RC(pim_post_batch(b, items, 0), PIM_OK);
    CHECK_RC(pim_post_batch(b, NULL, 2), PIM_ERR_INVALID);
    /* Invalid items (NULL conv, only one of sender/device, payload NULL with a
     * length, conv not UTF-8) get PIM_ERR_INVALID; the valid ones are posted. */
    pim_post_item mixed[6];
    memset(mixed, 0, sizeof mixed);
    for (int i = 0; i < 6; i++) {
        mixed[i].conv = "team"; mixed[i].payload = "m"; mixed[i].len = 1;
        mixed[i].status = 99; mixed[i].seq = 77; /* garbage the call must overwrite */
    }
    mixed[1].conv = NULL;
    mixed[2].sender = "bob";
    mixed[3].payload = NULL;
    mixed[4].conv = "te\xff\xfe";
    uint64_t before_batch = 0, after_batch = 0;
    CHECK_RC(pim_unread_count(b, "bob", "team", &before_batch), PIM_OK);
    CHECK_RC(pim_post_batch(b, mixed, 6), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "item 1") != NULL, "the error names the first bad item (%s)", pim_last_error());
    CHECK(mixed[0].status == PIM_OK && mixed[5].status == PIM_OK && mixed[0].seq && mixed[5].seq > mixed[0].seq,
          "the valid items are posted (%d seq %llu, %d seq %llu)", mixed[0].status, (unsigned long long)mixed[0].seq,
          mixed[5].status, (unsigned long long)mixed[5].seq);
    for (int i = 1; i <= 4; i++)
        CHECK(mixed[i].status == PIM_ERR_INVALID && mixed[i].seq == 0, "bad item %d: %s, seq %llu", i,
              pim_strerror(mixed[i].status), (unsigned long long)mixed[i].seq);
    CHECK_RC(pim_unread_count(b, "bob", "team", &after_batch), PIM_OK);
    CHECK(after_batch == before_batch + 2, "bob's unread grew by the 2 valid items (%llu -> %llu)",
          (unsigned long long)before_batch, (unsigned long long)after_batch);
    /* A failed call (NULL broker) marks every item with its status. */
    mixed[0].status = PIM_OK;
    CHECK_RC(pim_post_batch(NULL, mixed, 1), PIM_ERR_INVALID);
    CHECK(mixed[0].status == PIM_ERR_INVALID && mixed[0].seq == 0, "a failed call marks its items (%d)", mixed[0].status);

    char *token = NULL;
    CHECK_RC(pim_token_issue(b, "alice", "phone", 0, &token), PIM_ERR_INVALID);
    CHECK_RC(pim_token_issue(b, "alice", "phone", 60, NULL), PIM_ERR_INVALID);
    CHECK_RC(pim_token_issue(b, "has space", NULL, 60, &token), PIM_ERR_INVALID);
    CHECK_RC(pim_kick(b, "alice", NULL, "review"), PIM_OK);
    CHECK_RC(pim_kick(b, NULL, NULL, NULL), PIM_ERR_INVALID);
    int64_t before = 0;
    CHECK_RC(pim_revoke(b, "mallory", NULL, 0, &before), PIM_OK);
    CHECK(before > 1600000000000000LL, "pim_revoke returns the time in force (%lld µs)", (long long)before);
    CHECK_RC(pim_revoke(b, "mallory", NULL, -1, NULL), PIM_ERR_INVALID);

    /* A Python SDK client logged in as the recipient receives what C posts. */
    sdk_client_receives(b, python, test_dir, port);

    /* Callbacks calling back into the library. */
    CHECK_RC(pim_set_event_callback(b, NULL, on_event, &main_log, 42), PIM_ERR_INVALID);
    CHECK_RC(pim_set_event_callback(b, "no spaces allowed", on_event, &main_log, 0), PIM_ERR_INVALID);
    reentry on_loop = {b, -1, -1, -1, -1, -1, 0};
    CHECK_RC(pim_set_event_callback(b, "reenter", on_loop_reenters, &on_loop, PIM_EVENTS_ON_LOOP_THREAD), PIM_OK);
    CHECK(wait_flag(&on_loop.done, 20), "the loop-thread callback ran");
    CHECK(on_loop.post_rc == PIM_ERR_WOULD_DEADLOCK && on_loop.unread_rc == PIM_ERR_WOULD_DEADLOCK,
          "blocking calls from the loop thread: %s, %s", pim_strerror(on_loop.post_rc), pim_strerror(on_loop.unread_rc));
    reentry on_thread = {b, -1, -1, -1, -1, -1, 0};
    CHECK_RC(pim_set_event_callback(b, "reenter", on_thread_reenters, &on_thread, 0), PIM_OK);
    CHECK_RC(pim_post(b, "team", NULL, NULL, "wake the callback", 17, NULL, NULL, NULL), PIM_OK);
    CHECK(wait_flag(&on_thread.done, 20), "the dispatcher-thread callback ran");
    CHECK(on_thread.post_rc == PIM_OK, "pim_post from a callback thread works (%s)", pim_strerror(on_thread.post_rc));
    CHECK(on_thread.stop_rc == PIM_ERR_WOULD_DEADLOCK && on_thread.set_cb_rc == PIM_ERR_WOULD_DEADLOCK
              && on_thread.free_rc == PIM_ERR_WOULD_DEADLOCK,
          "stop/set_event_callback/free from the callback: %s, %s, %s", pim_strerror(on_thread.stop_rc),
          pim_strerror(on_thread.set_cb_rc), pim_strerror(on_thread.free_rc));
    CHECK_RC(pim_set_event_callback(b, "reenter", NULL, NULL, 0), PIM_OK);

    /* 4 threads post concurrently; the event callbacks see every message. */
    pthread_mutex_init(&main_log.mu, NULL);
    pthread_mutex_init(&keeper_log.mu, NULL);
    keeper_log.keep = 1;
    CHECK_RC(pim_set_event_callback(b, NULL, on_event, &main_log, 0), PIM_OK);
    CHECK_RC(pim_set_event_callback(b, "keeper", on_event, &keeper_log, 0), PIM_OK);
    enum { THREADS = 4 };
    poster posters[THREADS];
    pthread_t threads[THREADS];
    uint64_t *all = (uint64_t *)calloc((size_t)THREADS * per_thread, sizeof *all);
    t0 = now_s();
    for (int i = 0; i < THREADS; i++) {
        posters[i] = (poster){b, i, per_thread, 0, all + (size_t)i * per_thread};
        pthread_create(&threads[i], NULL, post_many, &posters[i]);
    }
    int errors = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        errors += posters[i].errors;
    }
    double took = now_s() - t0;
    long total = (long)THREADS * per_thread;
    printf("#    %ld posts from %d threads in %.2f s (%.0f/s)\n", total, THREADS, took, total / took);
    CHECK(errors == 0, "every post from the threads succeeded (%d errors)", errors);
    qsort(all, (size_t)total, sizeof *all, cmp_u64);
    int contiguous = 1;
    for (long i = 1; i < total; i++)
        contiguous &= all[i] == all[i - 1] + 1;
    CHECK(contiguous && all[0] == 1, "%ld posts got seqs 1..%ld exactly, no duplicates", total, total);
    free(all);
    CHECK_RC(pim_unread_count(b, "bob", "load", &n), PIM_OK);
    CHECK(n == (uint64_t)total, "bob has %ld unread in load (%llu)", total, (unsigned long long)n);
    CHECK(wait_messages(&main_log, total, 60) && wait_messages(&keeper_log, total, 60),
          "the event callbacks saw every message-stored event (%ld, %ld of %ld)", log_messages(&main_log),
          log_messages(&keeper_log), total);
    CHECK(main_log.duplicates == 0 && keeper_log.duplicates == 0 && main_log.messages == total,
          "...each once (%ld, %ld duplicates)", main_log.duplicates, keeper_log.duplicates);
    CHECK(main_log.other_conv >= 10, "...and the other conversations' messages too (%ld)", main_log.other_conv);
    uint64_t cursor = 0;
    pthread_mutex_lock(&main_log.mu);
    uint64_t last_id = main_log.last_id;
    pthread_mutex_unlock(&main_log.mu);
    CHECK_RC(pim_ack_events(b, NULL, last_id, &cursor), PIM_OK);
    CHECK(cursor == last_id, "pim_ack_events moved the cursor to %llu", (unsigned long long)cursor);

    /* Stop: flushed; later calls fail clearly; stopping again is fine. */
    t0 = now_s();
    CHECK_RC(pim_broker_stop(b), PIM_OK);
    printf("#    stop took %.0f ms\n", (now_s() - t0) * 1e3);
    CHECK_RC(pim_broker_stop(b), PIM_OK);
    CHECK_RC(pim_post(b, "team", NULL, NULL, "late", 4, NULL, NULL, NULL), PIM_ERR_STOPPED);
    CHECK_RC(pim_broker_port(b, &port), PIM_ERR_STOPPED);
    CHECK_RC(pim_unread_count(b, "bob", "team", &n), PIM_ERR_STOPPED);
    CHECK_RC(pim_set_event_callback(b, NULL, on_event, &main_log, 0), PIM_ERR_STOPPED);
    CHECK_RC(pim_broker_free(b), PIM_OK);
    CHECK_RC(pim_broker_free(NULL), PIM_OK);

    /* Restart on the same data directory: nothing lost. */
    CHECK_RC(pim_broker_start(config, &b), PIM_OK);
    if (!b)
        return 1;
    CHECK_RC(pim_unread_count(b, "bob", "load", &n), PIM_OK);
    CHECK(n == (uint64_t)total, "after the restart bob still has %ld unread in load (%llu)", total,
          (unsigned long long)n);
    uint64_t seq = 0;
    CHECK_RC(pim_post(b, "load", NULL, NULL, "after", 5, NULL, NULL, &seq), PIM_OK);
    CHECK(seq == (uint64_t)total + 1, "the next post is seq %ld (%llu)", total + 1, (unsigned long long)seq);
    event_log *after_main = (event_log *)calloc(1, sizeof *after_main);
    event_log *after_keeper = (event_log *)calloc(1, sizeof *after_keeper);
    pthread_mutex_init(&after_main->mu, NULL);
    pthread_mutex_init(&after_keeper->mu, NULL);
    CHECK_RC(pim_set_event_callback(b, NULL, on_event, after_main, 0), PIM_OK);
    CHECK_RC(pim_set_event_callback(b, "keeper", on_event, after_keeper, 0), PIM_OK);
    CHECK(wait_messages(after_main, 1, 30) && wait_messages(after_keeper, total + 1, 60),
          "after the restart: the acknowledged consumer gets the new message, the keeping one all %ld again",
          total + 1);
    CHECK(after_main->first_id == last_id + 1 && after_main->messages == 1,
          "...the acknowledged one from event %llu on (%llu)", (unsigned long long)last_id + 1,
          (unsigned long long)after_main->first_id);
    CHECK(after_keeper->first_id == 1 && after_keeper->duplicates == 0, "...the keeping one from event 1 (%llu)",
          (unsigned long long)after_keeper->first_id);
    CHECK_RC(pim_broker_free(b), PIM_OK);
    free(after_main);
    free(after_keeper);

    /* Without events there is no event callback. */
    char plain[4096];
    snprintf(plain, sizeof plain, "{\"data_dir\": \"%s-plain\", \"durability\": \"os\"}", dir);
    CHECK_RC(pim_broker_start(plain, &b), PIM_OK);
    if (b) {
        CHECK_RC(pim_set_event_callback(b, NULL, on_event, &main_log, 0), PIM_ERR_INVALID);
        CHECK_RC(pim_broker_port(b, &port), PIM_ERR_NOT_FOUND);
        CHECK_RC(pim_broker_free(b), PIM_OK);
    }

    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}

static int run_init_fails(void)
{
    pim_broker *b = NULL;
    for (int i = 0; i < 2; i++) {
        CHECK_RC(pim_broker_start("{}", &b), PIM_ERR_INIT);
        CHECK(*pim_last_error() != 0, "the reason: %s", pim_last_error());
    }
    CHECK(b == NULL, "no handle");
    CHECK(strcmp(pim_strerror(PIM_ERR_INIT), "the embedded Python or pimcore did not start") == 0, "pim_strerror still works");
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}

/* Several threads make the process's first pimcore call at once: each must
 * get its answer (here PIM_ERR_CONFIG for a config that is no object).  The
 * first call starts Python and runs cffi's init code; taking the GIL before
 * cffi's start-up lock deadlocked against the thread running that init code
 * as soon as it let go of the GIL (an os.stat): a hang, every time, with 2
 * threads or more. */
#define RACE_THREADS 8
static pthread_barrier_t race_barrier;
static int race_rc[RACE_THREADS];

static void *race_first_call(void *arg)
{
    int i = (int)(intptr_t)arg;
    pim_broker *b = NULL;
    pthread_barrier_wait(&race_barrier);
    race_rc[i] = pim_broker_start("[]", &b);
    return NULL;
}

static int run_first_calls_race(void)
{
    pthread_t t[RACE_THREADS];
    pthread_barrier_init(&race_barrier, NULL, RACE_THREADS);
    for (int i = 0; i < RACE_THREADS; i++)
        pthread_create(&t[i], NULL, race_first_call, (void *)(intptr_t)i);
    for (int i = 0; i < RACE_THREADS; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < RACE_THREADS; i++)
        CHECK(race_rc[i] == PIM_ERR_CONFIG, "thread %d: %d", i, race_rc[i]);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}


/* ------------------------------------------------------------ every event type and kind */

/* A copy of what the event callback saw (the event is valid only during the call). */
#define KEPT_EVENTS 64
typedef struct {
    char type[32], conv[64], user[64], sender[64], payload[64], muted[64], mentioned[64];
    int kind, mention_all, pinned, muted_setting, hidden;
    uint64_t seq, target, local_id;
    size_t n_muted, n_mentioned;
} kept_event;
static kept_event kept[KEPT_EVENTS];
static int n_kept;
static pthread_mutex_t kept_mu = PTHREAD_MUTEX_INITIALIZER;

static void copy_text(char *dst, size_t cap, const char *src, size_t len)
{
    if (!src)
        src = "(null)", len = 6;
    if (len >= cap)
        len = cap - 1;
    memcpy(dst, src, len);
    dst[len] = 0;
}

static int keep_event(const pim_event *ev, void *userdata)
{
    (void)userdata;
    pthread_mutex_lock(&kept_mu);
    if (n_kept < KEPT_EVENTS) {
        kept_event *k = &kept[n_kept++];
        copy_text(k->type, sizeof k->type, ev->type, strlen(ev->type));
        copy_text(k->conv, sizeof k->conv, ev->conv, strlen(ev->conv));
        copy_text(k->user, sizeof k->user, ev->user, strlen(ev->user));
        copy_text(k->sender, sizeof k->sender, ev->sender, strlen(ev->sender));
        copy_text(k->payload, sizeof k->payload, (const char *)ev->payload, ev->payload_len);
        k->kind = ev->kind;
        k->seq = ev->seq;
        k->target = ev->target;
        k->local_id = ev->local_id;
        k->n_muted = ev->n_muted_recipients;
        copy_text(k->muted, sizeof k->muted, ev->n_muted_recipients ? ev->muted_recipients[0] : "", ev->n_muted_recipients ? strlen(ev->muted_recipients[0]) : 0);
        k->n_mentioned = ev->n_mentioned;
        copy_text(k->mentioned, sizeof k->mentioned, ev->n_mentioned ? ev->mentioned[0] : "", ev->n_mentioned ? strlen(ev->mentioned[0]) : 0);
        k->mention_all = ev->mention_all;
        k->pinned = ev->pinned;
        k->muted_setting = ev->muted;
        k->hidden = ev->hidden;
    }
    pthread_mutex_unlock(&kept_mu);
    return PIM_EVENT_ACK;
}

static const kept_event *find_kept(const char *type, int kind, double timeout)
{
    double end = now_s() + timeout;
    for (;;) {
        pthread_mutex_lock(&kept_mu);
        for (int i = 0; i < n_kept; i++) {
            if (strcmp(kept[i].type, type) == 0 && (kind < 0 || kept[i].kind == kind)) {
                pthread_mutex_unlock(&kept_mu);
                return &kept[i];
            }
        }
        pthread_mutex_unlock(&kept_mu);
        if (now_s() > end)
            return NULL;
        usleep(2000);
    }
}

/* A Python SDK client (sdk_editor.py) sends, edits and recalls a message
 * and changes its conversation settings; the C callback gets each event
 * with the header's kinds and the fields to use them. */
static int run_event_kinds(const char *dir, const char *python, const char *test_dir)
{
    pim_broker *b = NULL;
    snprintf(config, sizeof config,
             "{\"data_dir\": \"%s\", \"durability\": \"os\", \"listen\": [\"tcp://127.0.0.1:0\"],"
             " \"server\": {\"events\": true}}", dir);
    CHECK_RC(pim_broker_start(config, &b), PIM_OK);
    if (!b)
        return 1;
    int port = 0;
    CHECK_RC(pim_broker_port(b, &port), PIM_OK);
    const char *members[] = {"alice", "bob"};
    CHECK_RC(pim_group_create(b, "team", members, 2), PIM_OK);
    CHECK_RC(pim_set_event_callback(b, NULL, keep_event, NULL, 0), PIM_OK);
    const char *carol[] = {"carol"};
    CHECK_RC(pim_group_add_members(b, "team", carol, 1), PIM_OK);
    char *token = NULL;
    CHECK_RC(pim_token_issue(b, "alice", NULL, 600, &token), PIM_OK);
    char cmd[8192], line[256] = "";
    snprintf(cmd, sizeof cmd, "'%s' '%s/sdk_editor.py' tcp://127.0.0.1:%d '%s' phone team bob", python, test_dir, port,
             token ? token : "");
    pim_free(token);
    FILE *child = popen(cmd, "r");
    CHECK(child != NULL, "the SDK client started");
    if (!child)
        return 1;
    unsigned long long seq = 0;
    int done = fgets(line, sizeof line, child) && sscanf(line, "done %llu", &seq) == 1;
    CHECK(done && seq > 0, "the SDK client sent, edited, recalled and pinned (%s)", line);
    CHECK(pclose(child) == 0, "the SDK client exited cleanly");

    CHECK(PIM_KIND_MESSAGE == 0 && PIM_KIND_JOINED == 1 && PIM_KIND_LEFT == 2 && PIM_KIND_RECALL == 3
              && PIM_KIND_EDIT == 4 && PIM_KIND_DELETE == 5, "the PIM_KIND_* values are pimcore's MessageKind");
    const kept_event *m = find_kept("message", PIM_KIND_MESSAGE, 20);
    CHECK(m && m->seq == seq && m->target == 0 && strcmp(m->sender, "alice") == 0 && m->local_id == 7
              && m->n_mentioned == 1 && strcmp(m->mentioned, "bob") == 0 && m->mention_all == 0,
          "the message: seq %llu, local id %llu, mentions %zu (%s)", m ? (unsigned long long)m->seq : 0ULL,
          m ? (unsigned long long)m->local_id : 0ULL, m ? m->n_mentioned : 0, m ? m->mentioned : "");
    const kept_event *e = find_kept("message", PIM_KIND_EDIT, 20);
    CHECK(e && e->target == seq && e->seq > seq && strcmp(e->payload, "edited") == 0,
          "the edit: kind %d, target %llu, payload %s", e ? e->kind : -1, e ? (unsigned long long)e->target : 0ULL,
          e ? e->payload : "");
    const kept_event *r = find_kept("message", PIM_KIND_RECALL, 20);
    CHECK(r && r->target == seq && e && r->seq > e->seq && r->payload[0] == 0,
          "the recall: kind %d, target %llu", r ? r->kind : -1, r ? (unsigned long long)r->target : 0ULL);
    const kept_event *c = find_kept("conversation", -1, 20);
    CHECK(c && strcmp(c->user, "alice") == 0 && strcmp(c->conv, "team") == 0 && c->pinned == 1
              && c->muted_setting == 1 && c->hidden == 0 && c->n_muted == 1 && strcmp(c->muted, "alice") == 0,
          "the settings: conversation event of %s in %s, pinned %d, muted %d, hidden %d", c ? c->user : "",
          c ? c->conv : "", c ? c->pinned : -1, c ? c->muted_setting : -1, c ? c->hidden : -1);
    const kept_event *j = find_kept("message", PIM_KIND_JOINED, 20);
    CHECK(j && strcmp(j->sender, "carol") == 0 && j->target == 0 && j->pinned == 0, "carol's JOINED entry (kind %d)",
          j ? j->kind : -1);
    CHECK_RC(pim_broker_free(b), PIM_OK);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}


/* ------------------------------------------------------------ fork */

/* The library is not fork-safe: after fork() the child's calls fail at once
 * with PIM_ERR_INIT (they hung: the child has the parent's Python state but
 * none of its threads).  The parent goes on as before. */
static int run_fork(const char *dir)
{
    pim_broker *b = NULL;
    snprintf(config, sizeof config, "{\"data_dir\": \"%s\", \"durability\": \"os\"}", dir);
    CHECK_RC(pim_broker_start(config, &b), PIM_OK);
    if (!b)
        return 1;
    const char *members[] = {"alice"};
    CHECK_RC(pim_group_create(b, "team", members, 1), PIM_OK);
    pid_t pid = fork();
    if (pid == 0) {
        /* The child: every call fails fast; exit status 0 if all did as
         * documented.  A hang ends with SIGALRM (the parent reports it). */
        alarm(20);
        int bad = 0;
        uint64_t n = 0;
        pim_broker *c = NULL;
        int rc = pim_post(b, "team", NULL, NULL, "x", 1, NULL, NULL, &n);
        bad |= rc != PIM_ERR_INIT || strstr(pim_last_error(), "fork") == NULL;
        printf("#    child: pim_post -> %s: %s\n", pim_strerror(rc), pim_last_error());
        rc = pim_unread_count(b, "alice", "team", &n);
        bad |= rc != PIM_ERR_INIT;
        snprintf(config, sizeof config, "{\"data_dir\": \"%s-child\", \"durability\": \"os\"}", dir);
        rc = pim_broker_start(config, &c);
        bad |= rc != PIM_ERR_INIT || c != NULL;
        printf("#    child: pim_broker_start -> %s: %s\n", pim_strerror(rc), pim_last_error());
        pim_post_item item = {"team", NULL, NULL, "x", 1, NULL, 0, 0, {0}};
        rc = pim_post_batch(b, &item, 1);
        bad |= rc != PIM_ERR_INIT || item.status != PIM_ERR_INIT;
        bad |= pim_broker_free(b) != PIM_ERR_INIT; /* the handle's memory is released */
        bad |= strcmp(pim_strerror(PIM_ERR_INIT), "the embedded Python or pimcore did not start") != 0;
        fflush(stdout);
        _exit(bad ? 3 : 0);
    }
    CHECK(pid > 0, "fork");
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "every call in the child failed fast with PIM_ERR_INIT (%d)",
          WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status));
    uint64_t seq = 0, n = 0;
    CHECK_RC(pim_post(b, "team", NULL, NULL, "parent", 6, NULL, NULL, &seq), PIM_OK);
    CHECK_RC(pim_unread_count(b, "alice", "team", &n), PIM_OK);
    CHECK(seq == 1 && n == 1, "the parent goes on: seq %llu, unread %llu", (unsigned long long)seq,
          (unsigned long long)n);
    CHECK_RC(pim_broker_free(b), PIM_OK);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}


/* ------------------------------------------------------------ pim_last_error is UTF-8 */

static int valid_utf8(const unsigned char *s)
{
    while (*s) {
        int n = *s < 0x80 ? 0 : (*s >> 5) == 6 ? 1 : (*s >> 4) == 14 ? 2 : (*s >> 3) == 30 ? 3 : -1;
        if (n < 0)
            return 0;
        s++;
        while (n--) {
            if ((*s & 0xC0) != 0x80)
                return 0;
            s++;
        }
    }
    return 1;
}

/* Error texts naming a long non-ASCII id are cut to fit, at a character
 * boundary: pim_last_error() is always valid UTF-8. */
static int run_last_error_utf8(const char *dir)
{
    pim_broker *b = NULL;
    snprintf(config, sizeof config, "{\"data_dir\": \"%s\", \"durability\": \"os\"}", dir);
    CHECK_RC(pim_broker_start(config, &b), PIM_OK);
    if (!b)
        return 1;
    for (int off = 0; off < 4; off++) {
        char conv[2000];
        int k = 0;
        for (int i = 0; i < off; i++)
            conv[k++] = 'a';
        while (k < 1500) { /* "üüü..." */
            conv[k++] = (char)0xc3;
            conv[k++] = (char)0xbc;
        }
        conv[k] = 0;
        int rc = pim_post(b, conv, NULL, NULL, "x", 1, NULL, NULL, NULL);
        const char *e = pim_last_error();
        CHECK(rc != PIM_OK && *e && valid_utf8((const unsigned char *)e), "offset %d: %s, %zu bytes of valid UTF-8",
              off, pim_strerror(rc), strlen(e));
        const char *users[] = {conv};
        rc = pim_group_create(b, "g", users, 1);
        e = pim_last_error();
        CHECK(rc != PIM_OK && *e && valid_utf8((const unsigned char *)e), "group member, offset %d: %s, %zu bytes",
              off, pim_strerror(rc), strlen(e));
    }
    CHECK_RC(pim_broker_free(b), PIM_OK);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}


/* ------------------------------------------------------------ argument checks */

static int keep_every_event(const pim_event *ev, void *userdata)
{
    (void)ev;
    (void)userdata;
    return PIM_EVENT_KEEP;
}

/* Arguments are checked as pimcore.h and bindings/README.md say. */
static int run_argument_checks(const char *dir)
{
    pim_broker *b = NULL;
    snprintf(config, sizeof config, "{\"data_dir\": \"%s\", \"durability\": \"os\", \"server\": {\"events\": true, \"consumer_idle\": 0}}",
             dir);
    /* The header version: 0.1.0 (100) up to this header's. */
    CHECK_RC(pim_broker_start_(config, &b, -5), PIM_ERR_VERSION);
    CHECK_RC(pim_broker_start_(config, &b, -10000), PIM_ERR_VERSION);
    CHECK_RC(pim_broker_start_(config, &b, 99), PIM_ERR_VERSION);
    CHECK(b == NULL, "no handle");
    CHECK_RC(pim_broker_start_(config, &b, 100), PIM_OK); /* a program built with the 0.1 header */
    CHECK_RC(pim_broker_free(b), PIM_OK);
    b = NULL;
    /* A string not UTF-8 is PIM_ERR_INVALID, the config string too. */
    CHECK_RC(pim_broker_start("{\"data_dir\": \"d\xff\"}", &b), PIM_ERR_INVALID);
    /* A data_dir that is not a directory: unusable settings. */
    CHECK_RC(pim_broker_start("{\"data_dir\": \"/etc/passwd\"}", &b), PIM_ERR_CONFIG);
    CHECK(strstr(pim_last_error(), "not a directory") != NULL, "%s", pim_last_error());

    CHECK_RC(pim_broker_start(config, &b), PIM_OK);
    if (!b)
        return 1;
    const char *members[] = {"alice", "bob"};
    CHECK_RC(pim_group_create(b, "team", members, 2), PIM_OK);
    /* The system is sender and device both NULL; an empty id is refused. */
    uint64_t seq = 0;
    CHECK_RC(pim_post(b, "team", "", "", "x", 1, NULL, NULL, &seq), PIM_ERR_INVALID);
    CHECK_RC(pim_post(b, "team", "", "web", "x", 1, NULL, NULL, &seq), PIM_ERR_INVALID);
    CHECK_RC(pim_post(b, "team", "alice", "", "x", 1, NULL, NULL, &seq), PIM_ERR_INVALID);
    CHECK(seq == 0, "nothing posted (seq %llu)", (unsigned long long)seq);
    pim_post_item items[2];
    memset(items, 0, sizeof items);
    items[0].conv = "team"; items[0].sender = ""; items[0].device = ""; items[0].payload = "x"; items[0].len = 1;
    items[1].conv = "team"; items[1].payload = "y"; items[1].len = 1;
    CHECK_RC(pim_post_batch(b, items, 2), PIM_ERR_INVALID);
    CHECK(items[0].status == PIM_ERR_INVALID && items[0].seq == 0 && items[1].status == PIM_OK && items[1].seq == 1,
          "batch: the empty sender refused (%s), the system's post stored (seq %llu)", pim_strerror(items[0].status),
          (unsigned long long)items[1].seq);
    /* An empty consumer name is refused by every function taking one. */
    CHECK_RC(pim_set_event_callback(b, "", NULL, NULL, 0), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "empty consumer id") != NULL, "the refusal says why: %s", pim_last_error());
    CHECK_RC(pim_set_event_callback(b, "", on_event, &main_log, 0), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "empty consumer id") != NULL, "the refusal says why: %s", pim_last_error());
    CHECK_RC(pim_ack_events(b, "", 1, NULL), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "empty consumer id") != NULL, "the refusal says why: %s", pim_last_error());
    CHECK_RC(pim_set_event_callback(b, "bad name", NULL, NULL, 0), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "has the character ' '") != NULL, "the refusal says why: %s", pim_last_error());
    CHECK_RC(pim_set_event_callback(b, "bad name", on_event, &main_log, 0), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "has the character ' '") != NULL, "the refusal says why: %s", pim_last_error());
    /* pim_ack_events past the last event: the cursor stops at the last one. */
    uint64_t cursor = 0, again = 0;
    CHECK_RC(pim_ack_events(b, "late", UINT64_MAX, &cursor), PIM_OK);
    CHECK(cursor > 0, "the cursor moved to the last event (%llu)", (unsigned long long)cursor);
    CHECK_RC(pim_ack_events(b, "late", cursor + 1000, &again), PIM_OK);
    CHECK(again == cursor, "and stays there (%llu)", (unsigned long long)again);
    CHECK_RC(pim_ack_events(b, "late", 1, &again), PIM_OK);
    CHECK(again == cursor, "never back (%llu)", (unsigned long long)again);
    /* pim_delete_consumer: "late" had a cursor (1), then has none (0). */
    int deleted = -1;
    CHECK_RC(pim_delete_consumer(b, "late", &deleted), PIM_OK);
    CHECK(deleted == 1, "the consumer's cursor was deleted (%d)", deleted);
    CHECK_RC(pim_delete_consumer(b, "late", &deleted), PIM_OK);
    CHECK(deleted == 0, "and then there was none (%d)", deleted);
    CHECK_RC(pim_delete_consumer(b, "late", NULL), PIM_OK);
    CHECK_RC(pim_delete_consumer(b, "", &deleted), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "empty consumer id") != NULL, "the refusal says why: %s", pim_last_error());
    /* A consumer whose callback is set is in use: refused, nothing deleted. */
    CHECK_RC(pim_set_event_callback(b, "busy", keep_every_event, NULL, 0), PIM_OK);
    CHECK_RC(pim_delete_consumer(b, "busy", &deleted), PIM_ERR_REFUSED);
    CHECK(strstr(pim_last_error(), "in use") != NULL, "the refusal says why: %s", pim_last_error());
    CHECK_RC(pim_set_event_callback(b, "busy", NULL, NULL, 0), PIM_OK);
    CHECK_RC(pim_delete_consumer(b, "busy", &deleted), PIM_OK);
    CHECK(deleted == 1, "once removed, its cursor is deleted (%d)", deleted);
    CHECK_RC(pim_broker_free(b), PIM_OK);
    /* A broker without events: setting a callback and removing one are both
     * PIM_ERR_INVALID, as pimcore.h says (a removal was PIM_OK: a trial). */
    snprintf(config, sizeof config, "{\"data_dir\": \"%s-noev\", \"durability\": \"os\"}", dir);
    CHECK_RC(pim_broker_start(config, &b), PIM_OK);
    if (!b)
        return 1;
    CHECK_RC(pim_set_event_callback(b, NULL, on_event, &main_log, 0), PIM_ERR_INVALID);
    CHECK_RC(pim_set_event_callback(b, NULL, NULL, NULL, 0), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "no host events") != NULL, "the refusal says why: %s", pim_last_error());
    CHECK_RC(pim_set_event_callback(b, "other", NULL, NULL, 0), PIM_ERR_INVALID);
    CHECK_RC(pim_delete_consumer(b, NULL, NULL), PIM_ERR_INVALID);
    CHECK(strstr(pim_last_error(), "no host events") != NULL, "the refusal says why: %s", pim_last_error());
    CHECK_RC(pim_broker_free(b), PIM_OK);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}

/* ------------------------------------------------------------ two threads setting one callback */

/* A new user's trial: two threads each set one consumer's callback, then one
 * removes it -- and the callback was still called (30 of 30 trials): both
 * settings started a dispatcher and the first was never stopped.  Then two
 * calls ran at once, ids went backwards, and the removal removed one of them. */
static pim_broker *cbr_broker;
static char cbr_consumer[32];
static pthread_barrier_t cbr_barrier;
static pthread_mutex_t cbr_mu = PTHREAD_MUTEX_INITIALIZER;
static int cbr_active, cbr_peak, cbr_removed, cbr_late, cbr_backwards;
/* Each setting's userdata: the last id that callback got (a replacement
 * starts again after the durable cursor: in order per setting). */
static uint64_t cbr_last[2][5];

static int cbr_cb(const pim_event *e, void *u)
{
    uint64_t *last = u;
    pthread_mutex_lock(&cbr_mu);
    if (++cbr_active > cbr_peak)
        cbr_peak = cbr_active;
    if (cbr_removed)
        cbr_late++;
    if (e->id <= *last)
        cbr_backwards++;
    *last = e->id;
    pthread_mutex_unlock(&cbr_mu);
    usleep(1000);
    pthread_mutex_lock(&cbr_mu);
    cbr_active--;
    pthread_mutex_unlock(&cbr_mu);
    return PIM_EVENT_ACK;
}

static void *cbr_setter(void *arg)
{
    int who = (int)(intptr_t)arg;
    pthread_barrier_wait(&cbr_barrier);
    for (int i = 0; i < 5; i++)
        pim_set_event_callback(cbr_broker, cbr_consumer, cbr_cb, &cbr_last[who][i], 0);
    return NULL;
}

static int run_callback_race(const char *dir)
{
    char json[512];
    snprintf(json, sizeof json, "{\"data_dir\": \"%s\", \"durability\": \"os\", \"server\": {\"events\": true}}", dir);
    CHECK_RC(pim_broker_start(json, &cbr_broker), PIM_OK);
    if (!cbr_broker)
        return 1;
    const char *members[] = {"a"};
    CHECK_RC(pim_group_create(cbr_broker, "g", members, 1), PIM_OK);
    int late_trials = 0;
    for (int trial = 0; trial < 8; trial++) {
        uint64_t cursor;
        snprintf(cbr_consumer, sizeof cbr_consumer, "c%d", trial);
        pim_post(cbr_broker, "g", NULL, NULL, "x", 1, NULL, NULL, NULL);
        pim_ack_events(cbr_broker, cbr_consumer, UINT64_MAX, &cursor); /* it starts at the end */
        pthread_mutex_lock(&cbr_mu);
        for (int i = 0; i < 10; i++)
            cbr_last[i / 5][i % 5] = cursor; /* the acknowledged ones are not delivered: ids above it only */
        pthread_mutex_unlock(&cbr_mu);
        pthread_barrier_init(&cbr_barrier, NULL, 2);
        pthread_t t[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&t[i], NULL, cbr_setter, (void *)(intptr_t)i);
        for (int i = 0; i < 20; i++)
            pim_post(cbr_broker, "g", NULL, NULL, "y", 1, NULL, NULL, NULL);
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
        pthread_barrier_destroy(&cbr_barrier);
        pim_set_event_callback(cbr_broker, cbr_consumer, NULL, NULL, 0);
        pthread_mutex_lock(&cbr_mu);
        cbr_removed = 1;
        cbr_late = 0;
        pthread_mutex_unlock(&cbr_mu);
        pim_post(cbr_broker, "g", NULL, NULL, "z", 1, NULL, NULL, NULL);
        usleep(200000);
        pthread_mutex_lock(&cbr_mu);
        if (cbr_late)
            late_trials++;
        cbr_removed = 0;
        pthread_mutex_unlock(&cbr_mu);
    }
    CHECK(late_trials == 0, "no callback after its removal (%d of 8 trials had some)", late_trials);
    CHECK(cbr_peak == 1, "one callback call at a time (%d at once)", cbr_peak);
    CHECK(cbr_backwards == 0, "ids in order per setting (%d went backwards or repeated)", cbr_backwards);
    CHECK_RC(pim_broker_free(cbr_broker), PIM_OK);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}

/* cross-stop (a new user's trial): broker A's event callback stops B while
 * B's callback stops A.  A stop waits for the broker's callbacks to return,
 * so both waited for each other for good, and a pim_broker_free(A) from
 * main after that hung too.  The stop that would close the cycle fails
 * with PIM_ERR_WOULD_DEADLOCK; the other stops its broker.  The caller
 * (test_cabi.py) runs this under a timeout: without the detection it hangs. */
static pim_broker *xs_broker[2];
static pthread_barrier_t xs_barrier;
static int xs_rc[2] = {-1, -1}, xs_started[2];

static int xs_cb(const pim_event *e, void *u)
{
    int me = (int)(intptr_t)u;
    (void)e;
    if (!xs_started[me]) {
        xs_started[me] = 1;
        pthread_barrier_wait(&xs_barrier); /* both callbacks run before either stops the other */
        xs_rc[me] = pim_broker_stop(xs_broker[1 - me]);
    }
    return PIM_EVENT_ACK;
}

static int run_cross_stop(const char *dir)
{
    char json[600];
    const char *members[] = {"alice"};
    pthread_barrier_init(&xs_barrier, NULL, 2);
    for (int i = 0; i < 2; i++) {
        snprintf(json, sizeof json, "{\"data_dir\": \"%s/%c\", \"durability\": \"os\", \"server\": {\"events\": true}}",
                 dir, 'a' + i);
        CHECK_RC(pim_broker_start(json, &xs_broker[i]), PIM_OK);
        if (!xs_broker[i])
            return 1;
        CHECK_RC(pim_group_create(xs_broker[i], "g", members, 1), PIM_OK);
        CHECK_RC(pim_post(xs_broker[i], "g", NULL, NULL, "x", 1, NULL, NULL, NULL), PIM_OK);
    }
    for (int i = 0; i < 2; i++)
        CHECK_RC(pim_set_event_callback(xs_broker[i], NULL, xs_cb, (void *)(intptr_t)i, 0), PIM_OK);
    double until = now_s() + 20;
    while ((xs_rc[0] < 0 || xs_rc[1] < 0) && now_s() < until)
        usleep(10000);
    CHECK(xs_rc[0] >= 0 && xs_rc[1] >= 0, "both callbacks' stops returned (%d, %d)", xs_rc[0], xs_rc[1]);
    CHECK((xs_rc[0] == PIM_OK && xs_rc[1] == PIM_ERR_WOULD_DEADLOCK) ||
              (xs_rc[0] == PIM_ERR_WOULD_DEADLOCK && xs_rc[1] == PIM_OK),
          "one stop went through, the one closing the cycle is PIM_ERR_WOULD_DEADLOCK (%s, %s)", pim_strerror(xs_rc[0]),
          pim_strerror(xs_rc[1]));
    int stopped = xs_rc[1] == PIM_OK ? 0 : 1; /* the broker the callback that got PIM_OK stopped */
    CHECK_RC(pim_post(xs_broker[stopped], "g", NULL, NULL, "y", 1, NULL, NULL, NULL), PIM_ERR_STOPPED);
    CHECK_RC(pim_post(xs_broker[1 - stopped], "g", NULL, NULL, "y", 1, NULL, NULL, NULL), PIM_OK);
    for (int i = 0; i < 2; i++)
        CHECK_RC(pim_broker_free(xs_broker[i]), PIM_OK);
    pthread_barrier_destroy(&xs_barrier);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}

/* setcb-stop (a new user's trial): pim_set_event_callback from 4 threads
 * while another stops the broker returned PIM_ERR_INTERNAL ("Nursery is
 * closed to new arrivals") in 8 of 20 rounds.  Now PIM_OK or PIM_ERR_STOPPED. */
static pim_broker *scs_broker;
static volatile int scs_done;
static int scs_unexpected;
static pthread_mutex_t scs_mu = PTHREAD_MUTEX_INITIALIZER;

static int scs_cb(const pim_event *e, void *u)
{
    (void)e;
    (void)u;
    return PIM_EVENT_ACK;
}

static void *scs_setter(void *arg)
{
    const char *consumer = (intptr_t)arg & 1 ? "c1" : "c2";
    for (int i = 0; !scs_done; i++) {
        int rc = pim_set_event_callback(scs_broker, consumer, (i & 1) ? scs_cb : NULL, NULL, 0);
        if (rc != PIM_OK && rc != PIM_ERR_STOPPED) {
            pthread_mutex_lock(&scs_mu);
            if (!scs_unexpected++)
                printf("     first unexpected: %s: %s\n", pim_strerror(rc), pim_last_error());
            pthread_mutex_unlock(&scs_mu);
        }
    }
    return NULL;
}

static int run_setcb_stop(const char *dir)
{
    char json[600];
    snprintf(json, sizeof json, "{\"data_dir\": \"%s\", \"durability\": \"os\", \"server\": {\"events\": true}}", dir);
    for (int round = 0; round < 20; round++) {
        int rc = pim_broker_start(json, &scs_broker);
        if (rc != PIM_OK) {
            CHECK_RC(rc, PIM_OK);
            return 1;
        }
        scs_done = 0;
        pthread_t t[4];
        for (intptr_t i = 0; i < 4; i++)
            pthread_create(&t[i], NULL, scs_setter, (void *)i);
        usleep(100000);
        pim_broker_stop(scs_broker);
        usleep(20000);
        scs_done = 1;
        for (int i = 0; i < 4; i++)
            pthread_join(t[i], NULL);
        pim_broker_free(scs_broker);
    }
    CHECK(scs_unexpected == 0, "set_event_callback racing stop: PIM_OK or PIM_ERR_STOPPED only (%d others)",
          scs_unexpected);
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 4 && strcmp(argv[1], "main") == 0) {
        char test_dir[4096];
        snprintf(test_dir, sizeof test_dir, "%s", argv[0]);
        char *slash = strrchr(test_dir, '/');
        /* sdk_receiver.py is next to this file's source; the caller passes its directory in PIM_TEST_DIR. */
        const char *dir = getenv("PIM_TEST_DIR");
        if (!dir) {
            if (slash)
                *slash = 0;
            dir = slash ? test_dir : ".";
        }
        return run_main(argv[2], argv[3], dir, argc >= 5 ? atoi(argv[4]) : 5000);
    }
    if (argc >= 2 && strcmp(argv[1], "init-fails") == 0)
        return run_init_fails();
    if (argc >= 2 && strcmp(argv[1], "first-calls-race") == 0)
        return run_first_calls_race();
    if (argc >= 3 && strcmp(argv[1], "argument-checks") == 0)
        return run_argument_checks(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "last-error-utf8") == 0)
        return run_last_error_utf8(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "fork") == 0)
        return run_fork(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "callback-race") == 0)
        return run_callback_race(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "cross-stop") == 0)
        return run_cross_stop(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "setcb-stop") == 0)
        return run_setcb_stop(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "event-kinds") == 0)
        return run_event_kinds(argv[2], argv[3], getenv("PIM_TEST_DIR") ? getenv("PIM_TEST_DIR") : ".");
    fprintf(stderr, "usage: %s main DATA_DIR PYTHON [POSTS_PER_THREAD] | init-fails | first-calls-race | event-kinds DATA_DIR PYTHON | fork DATA_DIR | last-error-utf8 DATA_DIR | argument-checks DATA_DIR | callback-race DATA_DIR | cross-stop DATA_DIR | setcb-stop DATA_DIR\n", argv[0]);
    return 2;
}
