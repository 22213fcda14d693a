using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Tests.Targets;

/// <summary>mincore(2) on a shared mapping of a file: which of its pages the page cache holds.</summary>
internal static unsafe partial class PageCache
{
    private const int PageSize = 4096;

    [LibraryImport("libc", SetLastError = true)]
    private static partial int mincore(void* addr, nuint length, byte* vec);

    /// <summary>How many pages of [<paramref name="offset"/>, +<paramref name="length"/>) of the file are cached (offset page-aligned).</summary>
    public static int ResidentPages(string path, long offset, int length)
    {
        var fd = Libc.OpenOrThrow(path, Libc.O_RDONLY);
        try
        {
            // Mapping faults nothing in; mincore reports the file's pages as the page cache has them.
            using var map = MappedMemory.Map(fd, 0, (nuint)(offset + length), Libc.PROT_READ, Libc.MAP_SHARED, path);
            var pages = (length + PageSize - 1) / PageSize;
            var vec = stackalloc byte[pages];
            if (mincore(map.Pointer + offset, (nuint)length, vec) != 0)
            {
                throw new ErrnoException(Marshal.GetLastPInvokeError(), $"mincore {path}");
            }
            var resident = 0;
            for (var i = 0; i < pages; i++)
            {
                resident += vec[i] & 1;
            }
            return resident;
        }
        finally
        {
            _ = Libc.close(fd);
        }
    }
}
