/*
 * vfs.c — the syscall table.
 *
 * Every file operation of the engine is made through `qlog_sys`, a table of
 * function pointers.  The default entries are the real system calls; tests
 * install another table to drop unsynced bytes at a simulated power cut,
 * to tear writes, or to fail with EIO/ENOSPC (the approach of SQLite's
 * test VFS).  The table is process-wide and is replaced only while no log
 * is open.
 */
#define _GNU_SOURCE
#include "vfs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

static int sys_open(const char *path, int flags, int mode)
{
    int fd;
    do
        fd = open(path, flags | O_CLOEXEC, mode);
    while (fd < 0 && errno == EINTR);
    return fd;
}

static int sys_close(int fd) { return close(fd); }

static int64_t sys_pread(int fd, void *buf, size_t n, int64_t off)
{
    ssize_t r;
    do
        r = pread(fd, buf, n, (off_t)off);
    while (r < 0 && errno == EINTR);
    return r;
}

/* Writes all n bytes unless an error stops it: Linux moves at most about
 * 2 GiB per call, and a signal may cut a write short. */
static int64_t sys_pwrite(int fd, const void *buf, size_t n, int64_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pwrite(fd, (const char *)buf + done, n - done, (off_t)(off + (int64_t)done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return done ? (int64_t)done : -1;
        }
        if (r == 0)
            break;
        done += (size_t)r;
    }
    return (int64_t)done;
}

static int sys_fdatasync(int fd) { return fdatasync(fd); }
static int sys_fsync(int fd) { return fsync(fd); }
static int sys_rename(const char *a, const char *b) { return rename(a, b); }
static int sys_unlink(const char *p) { return unlink(p); }

static int sys_ftruncate(int fd, int64_t len)
{
    int r;
    do
        r = ftruncate(fd, (off_t)len);
    while (r < 0 && errno == EINTR);
    return r;
}

/* Allocates the blocks as well as the size, so that a later store through
 * the shared mapping can never fault for lack of space (SIGBUS): a full
 * disk shows here, as a clean error, before any byte of a batch is written. */
static int sys_fallocate(int fd, int64_t off, int64_t len)
{
    int r;
    do
        r = posix_fallocate(fd, (off_t)off, (off_t)len);
    while (r == EINTR);
    return r;
}

static int sys_mkdir(const char *p, int mode) { return mkdir(p, (mode_t)mode); }

static void *sys_mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off)
{
    return mmap(addr, len, prot, flags, fd, (off_t)off);
}

static int sys_munmap(void *addr, size_t len) { return munmap(addr, len); }

static int sys_boot_id(char *out, size_t n)
{
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    if (!f) {
        /* No procfs: an empty id makes every unclean open look like a
         * reboot, which is the safe side (sequence numbers skip ahead). */
        if (n)
            out[0] = '\0';
        return 0;
    }
    if (!fgets(out, (int)n, f))
        out[0] = '\0';
    fclose(f);
    out[strcspn(out, "\n")] = '\0';
    return 0;
}

static int sys_writeback(int fd, int64_t off, int64_t len)
{
    return sync_file_range(fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
}

static int sys_fs_type(const char *path, int64_t *type)
{
    struct statfs s;
    if (statfs(path, &s) != 0)
        return -1;
    *type = (int64_t)s.f_type;
    return 0;
}

static int sys_link(const char *from, const char *to) { return link(from, to); }

static const qlog_vfs default_table = {
    sys_open, sys_close, sys_pread, sys_pwrite, sys_fdatasync, sys_fsync,
    sys_rename, sys_unlink, sys_ftruncate, sys_fallocate, sys_mkdir,
    sys_mmap, sys_munmap, sys_boot_id, sys_writeback, sys_fs_type, sys_link,
};

qlog_vfs qlog_sys = {
    sys_open, sys_close, sys_pread, sys_pwrite, sys_fdatasync, sys_fsync,
    sys_rename, sys_unlink, sys_ftruncate, sys_fallocate, sys_mkdir,
    sys_mmap, sys_munmap, sys_boot_id, sys_writeback, sys_fs_type, sys_link,
};

void qlog_vfs_get(qlog_vfs *out) { *out = qlog_sys; }
void qlog_vfs_get_default(qlog_vfs *out) { *out = default_table; }

void qlog_vfs_set(const qlog_vfs *t)
{
    qlog_vfs n = *t;
    /* A NULL entry means "the real call". */
    if (!n.open) n.open = default_table.open;
    if (!n.close) n.close = default_table.close;
    if (!n.pread) n.pread = default_table.pread;
    if (!n.pwrite) n.pwrite = default_table.pwrite;
    if (!n.fdatasync) n.fdatasync = default_table.fdatasync;
    if (!n.fsync) n.fsync = default_table.fsync;
    if (!n.rename) n.rename = default_table.rename;
    if (!n.unlink) n.unlink = default_table.unlink;
    if (!n.ftruncate) n.ftruncate = default_table.ftruncate;
    if (!n.fallocate) n.fallocate = default_table.fallocate;
    if (!n.mkdir) n.mkdir = default_table.mkdir;
    if (!n.mmap) n.mmap = default_table.mmap;
    if (!n.munmap) n.munmap = default_table.munmap;
    if (!n.boot_id) n.boot_id = default_table.boot_id;
    if (!n.writeback) n.writeback = default_table.writeback;
    if (!n.fs_type) n.fs_type = default_table.fs_type;
    if (!n.link) n.link = default_table.link;
    qlog_sys = n;
}
