/* vfs.h — the engine's view of the syscall table (see vfs.c). */
#ifndef QLOG_VFS_H
#define QLOG_VFS_H
#include "qlog.h"

extern qlog_vfs qlog_sys;

#endif
