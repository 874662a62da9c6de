export class ProgressRelay {}
