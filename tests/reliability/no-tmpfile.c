/* no-tmpfile.c: LD_PRELOAD'ed into lpipe by test-crash-safety, makes the
 * file system look like one without O_TMPFILE (NFS, FUSE, vfat...): opening
 * with O_TMPFILE fails with EOPNOTSUPP, as there, so the sink falls back to
 * its named, locked temporary file. Nothing else changes.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
/* Both open and open64 are defined here: no redirection of one to the other. */
#undef _FILE_OFFSET_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>

typedef int (*OpenFunc) (const char *, int, ...);

static int
open_without_tmpfile (const char *symbol,
                      const char *path,
                      int         flags,
                      mode_t      mode)
{
  OpenFunc real = (OpenFunc) dlsym (RTLD_NEXT, symbol);

  if ((flags & O_TMPFILE) == O_TMPFILE)
    {
      errno = EOPNOTSUPP;
      return -1;
    }
  return real (path, flags, mode);
}

int
open (const char *path,
      int         flags,
      ...)
{
  va_list args;
  mode_t mode;

  va_start (args, flags);
  mode = va_arg (args, mode_t);
  va_end (args);
  return open_without_tmpfile ("open", path, flags, mode);
}

int
open64 (const char *path,
        int         flags,
        ...)
{
  va_list args;
  mode_t mode;

  va_start (args, flags);
  mode = va_arg (args, mode_t);
  va_end (args);
  return open_without_tmpfile ("open64", path, flags, mode);
}
