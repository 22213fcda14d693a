using System.Runtime.InteropServices;

namespace UblkSharp.Interop.Ceph;

/// <summary>
/// librbd's asynchronous IO. A completion is created per operation with a callback and an
/// argument, and librbd calls the callback on one of its threads when the operation is done
/// (the rbd target's queues use it to post to their own eventfd: RbdCompletionMailbox).
/// </summary>
internal static unsafe partial class RbdAio
{
    private const string Lib = "librbd.so.1";

    [LibraryImport(Lib, EntryPoint = "rbd_aio_create_completion")]
    public static partial int rbd_aio_create_completion(nint arg, nint callback, out nint completion);

    [LibraryImport(Lib, EntryPoint = "rbd_aio_get_return_value")]
    public static partial nint rbd_aio_get_return_value(nint completion);

    [LibraryImport(Lib, EntryPoint = "rbd_aio_release")]
    public static partial void rbd_aio_release(nint completion);

    [LibraryImport(Lib, EntryPoint = "rbd_aio_read2")]
    public static partial int rbd_aio_read2(nint image, ulong offset, nuint length, byte* buffer, nint completion, int opFlags);

    [LibraryImport(Lib, EntryPoint = "rbd_aio_write2")]
    public static partial int rbd_aio_write2(nint image, ulong offset, nuint length, byte* buffer, nint completion, int opFlags);

    [LibraryImport(Lib, EntryPoint = "rbd_aio_discard")]
    public static partial int rbd_aio_discard(nint image, ulong offset, ulong length, nint completion);

    [LibraryImport(Lib, EntryPoint = "rbd_aio_write_zeroes")]
    public static partial int rbd_aio_write_zeroes(nint image, ulong offset, nuint length, nint completion, int zeroFlags, int opFlags);

    [LibraryImport(Lib, EntryPoint = "rbd_aio_flush")]
    public static partial int rbd_aio_flush(nint image, nint completion);
}
