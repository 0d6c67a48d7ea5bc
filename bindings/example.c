/* The README's example: start a broker, make a group, post, read unread. */
#include <stdio.h>
#include <string.h>
#include "pimcore.h"

int main(int argc, char **argv)
{
    const char *config = argc > 1 ? argv[1] : "{\"data_dir\": \"example-data\", \"listen\": [\"tcp://127.0.0.1:0\"]}";
    pim_broker *b;
    int rc = pim_broker_start(config, &b), port = 0;
    if (rc != PIM_OK) {
        fprintf(stderr, "start: %s: %s\n", pim_strerror(rc), pim_last_error());
        return 1;
    }
    pim_broker_port(b, &port);
    const char *members[] = {"alice", "bob"};
    pim_group_create(b, "team", members, 2); /* PIM_ERR_ALREADY_EXISTS on a second run */
    uint64_t seq = 0, unread = 0;
    const char *text = "{\"text\": \"hello from C\"}";
    rc = pim_post(b, "team", NULL, NULL, text, strlen(text), NULL, NULL, &seq);
    if (rc == PIM_OK)
        rc = pim_unread_count(b, "bob", "team", &unread);
    printf("port %d: seq %llu, bob has %llu unread (%s)\n", port, (unsigned long long)seq,
           (unsigned long long)unread, pim_strerror(rc));
    pim_broker_free(b); /* stops: flushed and closed */
    return rc == PIM_OK ? 0 : 1;
}
