using System.Runtime.InteropServices;

namespace UblkSharp.Interop;

/// <summary>Linux errno values (x86-64 and arm64 share them) and their symbolic names.</summary>
public static class Errno
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int ESRCH = 3;
    public const int EINTR = 4;
    public const int EIO = 5;
    public const int ENXIO = 6;
    public const int E2BIG = 7;
    public const int EBADF = 9;
    public const int EAGAIN = 11;
    public const int ENOMEM = 12;
    public const int EACCES = 13;
    public const int EFAULT = 14;
    public const int EBUSY = 16;
    public const int EEXIST = 17;
    public const int ENODEV = 19;
    public const int ENOTDIR = 20;
    public const int EINVAL = 22;
    public const int ENFILE = 23;
    public const int EMFILE = 24;
    public const int ENOTTY = 25;
    public const int EFBIG = 27;
    public const int ENOSPC = 28;
    public const int ESPIPE = 29;
    public const int EROFS = 30;
    public const int ENOSYS = 38;
    public const int ETIME = 62;
    public const int EOVERFLOW = 75;
    public const int ENOBUFS = 105;
    public const int EOPNOTSUPP = 95;
    public const int ETIMEDOUT = 110;
    public const int EALREADY = 114;
    public const int ECANCELED = 125;

    /// <summary>The symbolic name, e.g. "EBADF", or "errno 300" for one this table lacks.</summary>
    public static string Name(int errno) => Math.Abs(errno) switch
    {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        ESRCH => "ESRCH",
        EINTR => "EINTR",
        EIO => "EIO",
        ENXIO => "ENXIO",
        E2BIG => "E2BIG",
        EBADF => "EBADF",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        ENODEV => "ENODEV",
        EINVAL => "EINVAL",
        ENFILE => "ENFILE",
        EMFILE => "EMFILE",
        ENOTTY => "ENOTTY",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ESPIPE => "ESPIPE",
        EROFS => "EROFS",
        ENOSYS => "ENOSYS",
        ETIME => "ETIME",
        EOVERFLOW => "EOVERFLOW",
        EOPNOTSUPP => "EOPNOTSUPP",
        ETIMEDOUT => "ETIMEDOUT",
        EALREADY => "EALREADY",
        ECANCELED => "ECANCELED",
        var n => $"errno {n}",
    };

    /// <summary>The number <see cref="Name"/> gave <paramref name="name"/> ("EIO" or "errno 300"); <see cref="FormatException"/> otherwise.</summary>
    public static int Number(string name)
    {
        if (name.StartsWith("errno ", StringComparison.Ordinal) && int.TryParse(name.AsSpan(6), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var n))
        {
            return n;
        }
        for (var e = 1; e < 256; e++)
        {
            if (Name(e) == name)
            {
                return e;
            }
        }
        throw new FormatException($"'{name}' is not an errno name");
    }

    /// <summary>"EBADF (9): Bad file descriptor".</summary>
    public static string Describe(int errno)
    {
        var n = Math.Abs(errno);
        return $"{Name(n)} ({n}): {Marshal.GetPInvokeErrorMessage(n)}";
    }
}

/// <summary>A failed system call, naming the operation and the errno.</summary>
public class ErrnoException : IOException
{
    public ErrnoException(int errno, string operation, string? hint = null)
        : base($"{operation} failed: {Interop.Errno.Describe(errno)}{(hint is null ? "" : ". " + hint)}")
    {
        Errno = Math.Abs(errno);
        Operation = operation;
        HResult = Errno;
    }

    /// <summary>The positive errno value.</summary>
    public int Errno { get; }

    public string Operation { get; }
}
