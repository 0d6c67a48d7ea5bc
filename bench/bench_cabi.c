/*
 * The C ABI's costs, from C: pim_post latency (p50, p99) from one thread and
 * from 4, and pim_post_batch throughput.  Built and run by bench/bench_cabi.py.
 *
 *   bench_cabi DATA_DIR DURABILITY POSTS BATCH
 */
#include "pimcore.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static const char payload[100] = "{\"text\": \"a benchmark message of about one hundred bytes, padded out to that size\"}";

typedef struct {
    pim_broker *b;
    int count;
    double *lat;
    int errors;
} job;

static void *poster(void *arg)
{
    job *j = (job *)arg;
    for (int i = 0; i < j->count; i++) {
        double t = now_us();
        if (pim_post(j->b, "bench", NULL, NULL, payload, sizeof payload, NULL, NULL, NULL) != PIM_OK)
            j->errors++;
        j->lat[i] = now_us() - t;
    }
    return NULL;
}

static void report(const char *what, double *lat, int n, double wall_us)
{
    qsort(lat, (size_t)n, sizeof *lat, cmp_d);
    printf("%s: %d posts, p50 %.0f us, p99 %.0f us, %.0f posts/s\n", what, n, lat[n / 2], lat[(int)(n * 0.99)],
           n / (wall_us / 1e6));
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s DATA_DIR DURABILITY POSTS BATCH\n", argv[0]);
        return 2;
    }
    int posts = atoi(argv[3]), batch = atoi(argv[4]);
    char config[4096];
    snprintf(config, sizeof config, "{\"data_dir\": \"%s\", \"durability\": \"%s\"}", argv[1], argv[2]);
    pim_broker *b;
    double t = now_us();
    int rc = pim_broker_start(config, &b);
    if (rc != PIM_OK) {
        fprintf(stderr, "start: %s: %s\n", pim_strerror(rc), pim_last_error());
        return 1;
    }
    printf("durability %s: first pim_broker_start (interpreter, imports, store) %.0f ms\n", argv[2], (now_us() - t) / 1e3);
    const char *members[] = {"alice", "bob"};
    pim_group_create(b, "bench", members, 2);
    for (int i = 0; i < 200; i++) /* warm up */
        pim_post(b, "bench", NULL, NULL, payload, sizeof payload, NULL, NULL, NULL);

    double *lat = (double *)calloc((size_t)posts, sizeof *lat);
    job one = {b, posts, lat, 0};
    t = now_us();
    poster(&one);
    report("pim_post, 1 thread", lat, posts, now_us() - t);

    enum { THREADS = 4 };
    job jobs[THREADS];
    pthread_t th[THREADS];
    t = now_us();
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (job){b, posts / THREADS, lat + i * (posts / THREADS), 0};
        pthread_create(&th[i], NULL, poster, &jobs[i]);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    report("pim_post, 4 threads", lat, (posts / THREADS) * THREADS, now_us() - t);

    pim_post_item *items = (pim_post_item *)calloc((size_t)batch, sizeof *items);
    int batches = posts / batch;
    t = now_us();
    for (int k = 0; k < batches; k++) {
        for (int i = 0; i < batch; i++) {
            items[i].conv = "bench";
            items[i].payload = payload;
            items[i].len = sizeof payload;
        }
        double t1 = now_us();
        if (pim_post_batch(b, items, (size_t)batch) != PIM_OK)
            one.errors++;
        lat[k] = now_us() - t1;
    }
    double wall = now_us() - t;
    qsort(lat, (size_t)batches, sizeof *lat, cmp_d);
    printf("pim_post_batch of %d: %d posts, %.0f posts/s (%.1f us per post; a batch p50 %.1f ms)\n", batch,
           batches * batch, batches * batch / (wall / 1e6), wall / (batches * batch), lat[batches / 2] / 1e3);
    t = now_us();
    rc = pim_broker_free(b);
    printf("pim_broker_stop (flush, close) %.0f ms\n", (now_us() - t) / 1e3);
    free(items);
    free(lat);
    int errors = one.errors;
    for (int i = 0; i < THREADS; i++)
        errors += jobs[i].errors;
    if (errors || rc != PIM_OK) {
        fprintf(stderr, "%d errors, stop: %s\n", errors, pim_strerror(rc));
        return 1;
    }
    return 0;
}
