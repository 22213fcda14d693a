using System.Runtime.InteropServices;

namespace UblkSharp.Nbd;

/// <summary>Whether a path is a socket (statx, whose layout is the same on every architecture).</summary>
internal static unsafe partial class UnixSocketFile
{
    private const int AT_FDCWD = -100;
    private const int AT_SYMLINK_NOFOLLOW = 0x100;
    private const uint STATX_TYPE = 1;
    private const int S_IFMT = 0xF000;
    private const int S_IFSOCK = 0xC000;

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int statx(int dirfd, string path, int flags, uint mask, byte* buffer);

    public static bool IsSocket(string path)
    {
        var buffer = stackalloc byte[256];
        if (statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, STATX_TYPE, buffer) != 0)
        {
            return false;
        }
        var mode = *(ushort*)(buffer + 28); // struct statx: stx_mode
        return (mode & S_IFMT) == S_IFSOCK;
    }
}
