using UblkSharp.Interop;

namespace UblkSharp.Tests.Targets;

/// <summary>fstat(2) for the two fields the loop tests need. x86-64 and arm64 both put st_size at 48 and st_blocks at 64.</summary>
internal static unsafe class FileStat
{
    /// <summary>512-byte blocks the file system has allocated to the file (st_blocks).</summary>
    public static long AllocatedBytes(string path) => Stat(path).Blocks * 512;

    public static long Size(string path) => Stat(path).Size;

    private static (long Size, long Blocks) Stat(string path)
    {
        var fd = Libc.OpenOrThrow(path, Libc.O_RDONLY);
        try
        {
            var buf = stackalloc byte[256];
            if (Libc.fstat(fd, buf) != 0)
            {
                throw new ErrnoException(System.Runtime.InteropServices.Marshal.GetLastPInvokeError(), $"fstat {path}");
            }
            return (*(long*)(buf + 48), *(long*)(buf + 64));
        }
        finally
        {
            _ = Libc.close(fd);
        }
    }
}
