using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Runtime;

/// <summary>
/// Which file a path named when a device was added: its st_dev and st_ino. A recipe names its
/// backing files by path, and a path may name another file later (the file replaced, renamed over,
/// a different file system mounted there); a recovery that opened it anyway would serve another
/// file's blocks as the device's, to a file system that trusts them.
/// </summary>
public readonly record struct FileIdentity(ulong Device, ulong Inode)
{
    /// <summary>The recipe members that name a data file by path: loop's and cow's "file", cow's "backing".</summary>
    public static IReadOnlyList<string> RecipeKeys { get; } = ["file", "backing"];

    /// <summary>The identity of the regular file at <paramref name="path"/>; null if there is none (missing, or a block device, which is named by its node).</summary>
    public static unsafe FileIdentity? Of(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        Libc.Statx st;
        if (Libc.statx(Libc.AT_FDCWD, path, 0, Libc.STATX_BASIC_STATS, &st) < 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            return errno is Errno.ENOENT or Errno.ENOTDIR ? null : throw new ErrnoException(errno, $"stat {path}");
        }
        const uint S_IFMT = 0xf000, S_IFREG = 0x8000;
        if ((st.stx_mode & S_IFMT) != S_IFREG)
        {
            return null;
        }
        return new FileIdentity(MakeDev(st.stx_dev_major, st.stx_dev_minor), st.stx_ino);
    }

    /// <summary>
    /// The identity of what descriptor <paramref name="fd"/> refers to, of any kind (a socket, a
    /// pipe); null if it is not open. A service's stderr is compared with JOURNAL_STREAM this way.
    /// </summary>
    public static unsafe FileIdentity? OfDescriptor(int fd)
    {
        Libc.Statx st;
        return Libc.statx(fd, "", Libc.AT_EMPTY_PATH, Libc.STATX_BASIC_STATS, &st) < 0
            ? null
            : new FileIdentity(MakeDev(st.stx_dev_major, st.stx_dev_minor), st.stx_ino);
    }

    /// <summary>The identities of the files <paramref name="recipe"/> names (<see cref="RecipeKeys"/>) that are regular files now.</summary>
    public static Dictionary<string, FileIdentity> OfRecipe(IReadOnlyDictionary<string, string> recipe)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        var files = new Dictionary<string, FileIdentity>();
        foreach (var key in RecipeKeys)
        {
            if (recipe.TryGetValue(key, out var path) && path.Length > 0 && Of(path) is FileIdentity id)
            {
                files[key] = id;
            }
        }
        return files;
    }

    /// <summary>
    /// Why recipe member <paramref name="key"/>'s <paramref name="path"/> must not be opened for device
    /// <paramref name="deviceId"/>, or null if it may: it names the file recorded, or nothing was recorded.
    /// </summary>
    public static string? Mismatch(uint deviceId, string key, string path, FileIdentity? recorded, FileIdentity? current)
    {
        if (recorded is not FileIdentity was || current == was)
        {
            return null;
        }
        var now = current is FileIdentity c ? $"now {c}" : "now no regular file";
        return $"device {deviceId}: its {key} {path} is not the file the device was added with ({was}, {now}); " +
            "refusing to serve another file's data as the device's. If the file was replaced on purpose, delete the device and add it again";
    }

    /// <summary>"device MAJOR:MINOR inode N", as stat(1) would show them.</summary>
    public override string ToString()
        => $"device {((Device >> 8) & 0xfff) | ((Device >> 32) & 0xfffff000)}:{(Device & 0xff) | ((Device >> 12) & 0xffffff00)} inode {Inode}";

    // glibc's makedev: the st_dev that stat(2) reports.
    private static ulong MakeDev(uint major, uint minor)
        => ((ulong)(major & 0xfffff000) << 32) | ((ulong)(major & 0xfff) << 8) | ((ulong)(minor & 0xffffff00) << 12) | (minor & 0xff);
}
