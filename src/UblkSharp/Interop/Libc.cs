using System.Runtime.InteropServices;

namespace UblkSharp.Interop;

/// <summary>The few libc entry points the binding needs. All are blittable direct calls.</summary>
internal static unsafe partial class Libc
{
    private const string Lib = "libc";

    // io_uring syscall numbers are shared by x86-64 and arm64 (asm-generic table).
    public const long SYS_io_uring_setup = 425;
    public const long SYS_io_uring_enter = 426;
    public const long SYS_io_uring_register = 427;

    public const int O_RDONLY = 0x0;
    public const int O_WRONLY = 0x1;
    public const int O_RDWR = 0x2;
    public const int O_CREAT = 0x40;
    public const int O_EXCL = 0x80;
    public const int O_TRUNC = 0x200;
    public const int O_DIRECT = 0x4000;
    public const int O_CLOEXEC = 0x80000;

    public const int PROT_READ = 0x1;
    public const int PROT_WRITE = 0x2;
    public const int MAP_SHARED = 0x01;
    public const int MAP_PRIVATE = 0x02;
    public const int MAP_ANONYMOUS = 0x20;
    public const int MAP_POPULATE = 0x8000;
    public const int MAP_NORESERVE = 0x4000;
    public static readonly nint MAP_FAILED = -1;

    public const int EFD_CLOEXEC = 0x80000;
    public const int EFD_NONBLOCK = 0x800;

    public const int AF_UNIX = 1;
    public const int SOCK_STREAM = 1;
    public const int SOCK_CLOEXEC = 0x80000;

    [LibraryImport(Lib, EntryPoint = "syscall", SetLastError = true)]
    public static partial long syscall(long number, long a1, long a2, long a3, long a4, long a5, long a6);

    [LibraryImport(Lib, EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int open(string path, int flags, int mode);

    [LibraryImport(Lib, EntryPoint = "close", SetLastError = true)]
    public static partial int close(int fd);

    [LibraryImport(Lib, EntryPoint = "mmap", SetLastError = true)]
    public static partial nint mmap(nint addr, nuint length, int prot, int flags, int fd, long offset);

    [LibraryImport(Lib, EntryPoint = "munmap", SetLastError = true)]
    public static partial int munmap(nint addr, nuint length);

    [LibraryImport(Lib, EntryPoint = "eventfd", SetLastError = true)]
    public static partial int eventfd(uint initval, int flags);

    [LibraryImport(Lib, EntryPoint = "socketpair", SetLastError = true)]
    public static partial int socketpair(int domain, int type, int protocol, int* fds);

    [LibraryImport(Lib, EntryPoint = "read", SetLastError = true)]
    public static partial nint read(int fd, void* buf, nuint count);

    [LibraryImport(Lib, EntryPoint = "write", SetLastError = true)]
    public static partial nint write(int fd, void* buf, nuint count);

    public const int MADV_DONTNEED = 4;

    [LibraryImport(Lib, EntryPoint = "madvise", SetLastError = true)]
    public static partial int madvise(nint addr, nuint length, int advice);

    [LibraryImport(Lib, EntryPoint = "sched_setaffinity", SetLastError = true)]
    public static partial int sched_setaffinity(int pid, nuint cpusetsize, byte* mask);

    [LibraryImport(Lib, EntryPoint = "sched_getaffinity", SetLastError = true)]
    public static partial int sched_getaffinity(int pid, nuint cpusetsize, byte* mask);

    [LibraryImport(Lib, EntryPoint = "gettid")]
    public static partial int gettid();

    /// <summary>Ends the process at once: no finalizers, no exit handlers that could block on a dead device.</summary>
    [LibraryImport(Lib, EntryPoint = "_exit")]
    public static partial void _exit(int status);

    [LibraryImport(Lib, EntryPoint = "kill", SetLastError = true)]
    public static partial int kill(int pid, int signal);

    [LibraryImport(Lib, EntryPoint = "fstat", SetLastError = true)]
    public static partial int fstat(int fd, byte* statbuf);

    [LibraryImport(Lib, EntryPoint = "ioctl", SetLastError = true)]
    public static partial int ioctl(int fd, ulong request, void* arg);

    [LibraryImport(Lib, EntryPoint = "fallocate", SetLastError = true)]
    public static partial int fallocate(int fd, int mode, long offset, long length);

    [LibraryImport(Lib, EntryPoint = "pread64", SetLastError = true)]
    public static partial nint pread(int fd, void* buf, nuint count, long offset);

    [LibraryImport(Lib, EntryPoint = "pwrite64", SetLastError = true)]
    public static partial nint pwrite(int fd, void* buf, nuint count, long offset);

    [LibraryImport(Lib, EntryPoint = "pwritev2", SetLastError = true)]
    public static partial nint pwritev2(int fd, IoUring.Iovec* iov, int iovcnt, long offset, int flags);

    [LibraryImport(Lib, EntryPoint = "fdatasync", SetLastError = true)]
    public static partial int fdatasync(int fd);

    [LibraryImport(Lib, EntryPoint = "fstatfs", SetLastError = true)]
    public static partial int fstatfs(int fd, void* buf);

    /// <summary>times null: both to now, as a write would set them.</summary>
    [LibraryImport(Lib, EntryPoint = "futimens", SetLastError = true)]
    public static partial int futimens(int fd, void* times);

    [LibraryImport(Lib, EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int ftruncate(int fd, long length);

    [LibraryImport(Lib, EntryPoint = "lseek", SetLastError = true)]
    public static partial long lseek(int fd, long offset, int whence);

    [LibraryImport(Lib, EntryPoint = "fcntl", SetLastError = true)]
    public static partial int fcntl(int fd, int cmd, void* arg);

    public const int F_GETFL = 3, F_SETFL = 4, O_NONBLOCK = 0x800;

    /// <summary>
    /// Makes <paramref name="fd"/> blocking in the kernel. .NET leaves a socket's fd non-blocking
    /// once it has been (it emulates blocking calls itself), which native code reading the fd
    /// (GnuTLS) would see as EAGAIN.
    /// </summary>
    public static void MakeBlocking(int fd)
    {
        var flags = fcntl(fd, F_GETFL, null);
        if (flags < 0 || ((flags & O_NONBLOCK) != 0 && fcntl(fd, F_SETFL, (void*)(nint)(flags & ~O_NONBLOCK)) < 0))
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), "fcntl", "F_SETFL ~O_NONBLOCK");
        }
    }

    /// <summary>Returns malloc'd memory (free it with NativeMemory.Free), or 0 with errno set.</summary>
    [LibraryImport(Lib, EntryPoint = "realpath", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nint realpath(string path, byte* resolved);

    /// <summary>The size of a block device in bytes (ioctl; a u64).</summary>
    public const ulong BLKGETSIZE64 = 0x80081272;
    public const int SEEK_END = 2;
    public const int F_OFD_SETLK = 37;

    public const int RWF_DSYNC = 0x2;
    public const long TMPFS_MAGIC = 0x01021994;
    public const long RAMFS_MAGIC = 0x858458f6;

    public const short POLLPRI = 0x2;
    public const short POLLERR = 0x8;

    [System.Runtime.InteropServices.StructLayout(System.Runtime.InteropServices.LayoutKind.Sequential)]
    public struct PollFd
    {
        public int fd;
        public short events;
        public short revents;
    }

    [LibraryImport(Lib, EntryPoint = "poll", SetLastError = true)]
    public static partial int poll(PollFd* fds, nuint nfds, int timeout);

    [LibraryImport(Lib, EntryPoint = "unlink", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int unlink(string path);

    [LibraryImport(Lib, EntryPoint = "getpid")]
    public static partial int getpid();

    [LibraryImport(Lib, EntryPoint = "geteuid")]
    public static partial uint geteuid();

    public const int R_OK = 4, W_OK = 2;

    /// <summary>access(2): whether the real user may read/write <paramref name="path"/> (0), else -1 and errno.</summary>
    [LibraryImport(Lib, EntryPoint = "access", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int access(string path, int mode);

    [LibraryImport(Lib, EntryPoint = "chown", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int chown(string path, uint owner, uint group);

    /// <summary>Opens a file and throws an <see cref="ErrnoException"/> naming the path on failure.</summary>
    public static int OpenOrThrow(string path, int flags, int mode = 0)
    {
        int fd;
        do
        {
            fd = open(path, flags | O_CLOEXEC, mode);
        }
        while (fd < 0 && Marshal.GetLastPInvokeError() == Errno.EINTR);
        if (fd < 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), $"open {path}");
        }
        return fd;
    }

    // pidfd (5.3+): a handle on one process that a recycled pid cannot redirect. The numbers are
    // the same on every architecture (the unified syscall table).
    public const long SYS_pidfd_send_signal = 424;
    public const long SYS_pidfd_open = 434;
    public const short POLLIN = 0x1;

    public const int AT_FDCWD = -100;
    public const int AT_EMPTY_PATH = 0x1000;
    public const uint STATX_BASIC_STATS = 0x7ff;

    /// <summary>struct statx: the same layout on every architecture, unlike struct stat.</summary>
    [StructLayout(LayoutKind.Explicit, Size = 256)]
    public struct Statx
    {
        [FieldOffset(20)]
        public uint stx_uid;
        [FieldOffset(24)]
        public uint stx_gid;
        [FieldOffset(28)]
        public ushort stx_mode;
        [FieldOffset(32)]
        public ulong stx_ino;
        [FieldOffset(136)]
        public uint stx_dev_major;
        [FieldOffset(140)]
        public uint stx_dev_minor;
    }

    [LibraryImport(Lib, EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int statx(int dirfd, string path, int flags, uint mask, Statx* buffer);

    public const int LOCK_EX = 2;
    public const int LOCK_NB = 4;

    [LibraryImport(Lib, EntryPoint = "flock", SetLastError = true)]
    public static partial int flock(int fd, int operation);
}
