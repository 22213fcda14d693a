using System.Runtime.InteropServices;

namespace UblkSharp.Interop.Ceph;

/// <summary>
/// librbd's C API (<c>rbd/librbd.h</c>; the librbd.so.1 ABI is stable across Ceph releases).
/// Images, synchronous IO, the exclusive lock and header watches (asynchronous IO: RbdAio). Errors are negative errnos.
/// </summary>
internal static unsafe partial class Rbd
{
    private const string Lib = "librbd.so.1";

    public const ulong FeatureExclusiveLock = 1ul << 2;

    public const int LockModeExclusive = 0;

    /// <summary>rbd_write_zeroes flag: keep the zeroed extent allocated (no hole).</summary>
    public const int WriteZeroesThickProvision = 1;

    [LibraryImport(Lib, EntryPoint = "rbd_open", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int rbd_open(nint ioctx, string name, out nint image, string? snapName);

    [LibraryImport(Lib, EntryPoint = "rbd_open_read_only", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int rbd_open_read_only(nint ioctx, string name, out nint image, string? snapName);

    [LibraryImport(Lib, EntryPoint = "rbd_snap_set_by_id")]
    public static partial int rbd_snap_set_by_id(nint image, ulong snapId);

    public const int EncryptionFormatLuks1 = 0;

    public const int EncryptionFormatLuks2 = 1;

    /// <summary>rbd_encryption_luks1_format_options_t and ..._luks2_... (the same layout); load ignores the algorithm.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct LuksOptions
    {
        public int Algorithm;
        public byte* Passphrase;
        public nuint PassphraseSize;
    }

    /// <summary>Opens the image's LUKS1/LUKS2 encryption: IO from then on is decrypted, and the size is the payload's.</summary>
    [LibraryImport(Lib, EntryPoint = "rbd_encryption_load")]
    public static partial int rbd_encryption_load(nint image, int format, LuksOptions* options, nuint optionsSize);

    [LibraryImport(Lib, EntryPoint = "rbd_close")]
    public static partial int rbd_close(nint image);

    [LibraryImport(Lib, EntryPoint = "rbd_get_size")]
    public static partial int rbd_get_size(nint image, out ulong size);

    [LibraryImport(Lib, EntryPoint = "rbd_get_features")]
    public static partial int rbd_get_features(nint image, out ulong features);

    [LibraryImport(Lib, EntryPoint = "rbd_lock_acquire")]
    public static partial int rbd_lock_acquire(nint image, int lockMode);

    /// <summary>The clients holding the image's lock, as "client.ID COOKIE"-style owner strings; -ERANGE if <paramref name="maxOwners"/> is too small (it is set to the count).</summary>
    [LibraryImport(Lib, EntryPoint = "rbd_lock_get_owners")]
    public static partial int rbd_lock_get_owners(nint image, out int lockMode, nint* owners, ref nuint maxOwners);

    [LibraryImport(Lib, EntryPoint = "rbd_lock_get_owners_cleanup")]
    public static partial void rbd_lock_get_owners_cleanup(nint* owners, nuint count);

    /// <summary>Breaks <paramref name="owner"/>'s lock; with rbd_blocklist_on_break_lock the owner is blocklisted first.</summary>
    [LibraryImport(Lib, EntryPoint = "rbd_lock_break")]
    public static partial int rbd_lock_break(nint image, int lockMode, nint owner);

    [LibraryImport(Lib, EntryPoint = "rbd_update_watch")]
    public static partial int rbd_update_watch(nint image, out ulong handle, delegate* unmanaged<nint, void> callback, nint arg);

    [LibraryImport(Lib, EntryPoint = "rbd_update_unwatch")]
    public static partial int rbd_update_unwatch(nint image, ulong handle);

    // Synchronous IO (the NBD export's worker threads): returns bytes done or a negative errno.
    [LibraryImport(Lib, EntryPoint = "rbd_read2")]
    public static partial nint rbd_read2(nint image, ulong offset, nuint length, byte* buffer, int opFlags);

    [LibraryImport(Lib, EntryPoint = "rbd_write2")]
    public static partial nint rbd_write2(nint image, ulong offset, nuint length, byte* buffer, int opFlags);

    [LibraryImport(Lib, EntryPoint = "rbd_discard")]
    public static partial int rbd_discard(nint image, ulong offset, ulong length);

    [LibraryImport(Lib, EntryPoint = "rbd_write_zeroes")]
    public static partial nint rbd_write_zeroes(nint image, ulong offset, nuint length, int zeroFlags, int opFlags);

    [LibraryImport(Lib, EntryPoint = "rbd_flush")]
    public static partial int rbd_flush(nint image);
}
