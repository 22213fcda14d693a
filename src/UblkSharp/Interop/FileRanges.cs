using System.Runtime.InteropServices;

namespace UblkSharp.Interop;

/// <summary>Where a file's data and holes are (lseek SEEK_DATA/SEEK_HOLE), and readahead hints.</summary>
internal static partial class FileRanges
{
    private const int SEEK_DATA = 3;
    private const int SEEK_HOLE = 4;
    private const int POSIX_FADV_WILLNEED = 3;

    [LibraryImport("libc", EntryPoint = "posix_fadvise")]
    private static partial int posix_fadvise(int fd, long offset, long length, int advice);

    /// <summary>
    /// The run at <paramref name="offset"/>: its length (at most <paramref name="length"/>) and
    /// whether it is a hole. A negative errno where the file system cannot tell (the caller then
    /// reports data). lseek moves the file position, which nothing here uses (all IO is positional).
    /// </summary>
    public static long Run(int fd, long offset, long length, out bool hole)
    {
        hole = false;
        var data = Libc.lseek(fd, offset, SEEK_DATA);
        if (data < 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            if (errno == Errno.ENXIO)
            {
                // No data from here to the end of the file.
                hole = true;
                return length;
            }
            return -errno;
        }
        if (data > offset)
        {
            hole = true;
            return Math.Min(data - offset, length);
        }
        var end = Libc.lseek(fd, offset, SEEK_HOLE);
        if (end < 0)
        {
            return -Marshal.GetLastPInvokeError();
        }
        return end <= offset ? length : Math.Min(end - offset, length);
    }

    /// <summary>Asks the kernel to read the range ahead; returns 0 or a negative errno.</summary>
    public static int WillNeed(int fd, long offset, long length) => -posix_fadvise(fd, offset, length, POSIX_FADV_WILLNEED);
}
